/*
 * The etsy StatsD daemon (npm "statsd", https://github.com/statsd/statsd) for mailengine:
 * what the shipped Grafana dashboard (grafana-dashboard.json) and alert rules
 * (grafana-alerts.yaml) read from Graphite. docs/MONITORING.md explains each setting;
 * tests/engine/test_dashboard.py runs the daemon with this file (its addresses and ports
 * replaced by loopback test ones) between the engine and carbon-cache.
 *
 *   node /path/to/node_modules/statsd/stats.js /usr/share/mailengine/monitoring/statsd-config.js
 */
{
  address: "127.0.0.1",          // UDP; "0.0.0.0" when the engine runs on other hosts
  port: 8125,                    // the engine's statsd.port
  mgmt_address: "127.0.0.1",     // the admin interface (TCP), loopback only
  mgmt_port: 8126,
  flushInterval: 10000,          // ms; the finest Graphite retention (storage-schemas.conf)
  // The dashboard's delivery time, pool wait and SMTP phase panels read upper_50, upper_95
  // and upper_99: each percentile it reads must be listed here.
  percentThreshold: [50, 95, 99],
  // Keep each gauge's last value between sends (the default): a provider's gauges that do
  // not change are sent once a minute only (docs/METRICS.md).
  deleteGauges: false,
  backends: ["./backends/graphite"],
  graphiteHost: "127.0.0.1",     // carbon-cache's plaintext receiver
  graphitePort: 2003,
  graphite: {
    legacyNamespace: true        // stats.<name>, stats_counts.<name>: the dashboard's names
  }
}
