"""mailengine: an outbound SMTP delivery engine (gevent workers, pooled smtplib, ZeroMQ intake)."""
from setuptools import find_packages, setup

setup(
    name="mailengine",
    version="0.1.0",
    description="Outbound SMTP delivery engine: pooled, pipelined, opportunistic TLS, one worker per sending IP",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["engine", "engine.*"]),
    package_data={"engine": ["py.typed"]},
    install_requires=[
        "gevent>=22.10",
        "pyzmq>=24",
        "dnspython>=2.3",
        "statsd>=4.0",
        "PyYAML>=6.0",
        "tqdm>=4.64",  # the progress bar of mailengine push
        # the Public Suffix List: engine/provider.py reads its data file (the Debian
        # package depends on the copy Debian ships, package publicsuffix, instead)
        "publicsuffixlist",
        # DKIM signing (engine/dkim.py): RSA and Ed25519 signatures, 25 times faster than the
        # pure-Python RSA of dkimpy (docs/PERFORMANCE.md), the verifier of the tests
        "cryptography>=38",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-randomly", "aiosmtpd", "trustme", "hypothesis",
                 "jsonschema",  # the TLS-RPT report checked against RFC 8460's format
                 "mypy", "ruff", "types-PyYAML", "types-tqdm",
                 # the independent DKIM verifier of the tests (PyNaCl: its Ed25519)
                 "dkimpy", "pynacl",
                 # the cluster tests (tests/*/test_cluster.py, with Debian's redis-server)
                 "redis"],
        # several engine hosts sharing limits and de-duplication in Redis (docs/SCALING.md);
        # on Debian: python3-redis
        "cluster": ["redis>=4.3"],
        # the demo's local SMTP server (engine/testing/sink.py) and its certificate
        "demo": ["aiosmtpd", "trustme"],
    },
    # The executables: the command, and the worker's entry (the one place that patches).
    scripts=["bin/mailengine", "bin/mailengine-worker"],
)
