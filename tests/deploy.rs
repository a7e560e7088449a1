//! The operator files, proven with the real tools: promtool, a real Prometheus scraping a
//! live cluster, the dashboard's every query, and the Kubernetes manifests.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("`{name}` is not installed: run scripts/test, which installs the Debian package `prometheus`"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_rules_their_tests_and_the_scrape_config() {
    let promtool = tool("promtool");
    let dir = repo("deploy/prometheus");
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "alerts.yml"])
            .current_dir(&dir),
    );
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    run_ok(
        Command::new(&promtool)
            .args(["check", "config", "prometheus.yml"])
            .current_dir(&dir),
    );
    // Every alert has a test that fires it and one that does not.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).unwrap();
    let runbook = std::fs::read_to_string(repo("deploy/RUNBOOK.md")).unwrap();
    let parsed: Value = serde_norway::from_str(&rules).unwrap();
    for rule in parsed["groups"][0]["rules"].as_array().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "{name} has no promtool test"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(rule["annotations"][key].is_string(), "{name} lacks {key}");
        }
        assert!(
            rule["labels"]["severity"].is_string(),
            "{name} lacks severity"
        );
        assert!(rule["for"].is_string(), "{name} lacks for");
        let url = rule["annotations"]["runbook_url"].as_str().unwrap();
        // Alertmanager and Grafana link it as is: a relative path is a broken link.
        assert!(
            url.starts_with("https://"),
            "{name}: runbook_url {url} is not absolute"
        );
        let anchor = url.split('#').nth(1).unwrap();
        let description = rule["annotations"]["description"].as_str().unwrap();
        assert!(
            description.contains("$value") || description.contains("$labels."),
            "{name}: the description shows neither the value nor the labels"
        );
        let heading = format!("## {name}");
        assert!(
            runbook.contains(&heading) && anchor == name.to_lowercase(),
            "runbook section for {name}"
        );
    }
}

/// Every panel target of the dashboard: (panel title, expr).
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or("").to_string()))
        })
        .collect()
}

#[test]
fn dashboard_is_structurally_sound() {
    let text = std::fs::read_to_string(repo("dashboards/raftchat-cluster.json")).unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    assert!(d["uid"].is_string() && d["title"].is_string() && d["refresh"].is_string());
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
    let mut ids = HashSet::new();
    let mut rows = 0;
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] == "row" {
            rows += 1;
            continue;
        }
        let title = p["title"].as_str().unwrap();
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title} has no description"
        );
        assert_eq!(
            p["datasource"]["uid"],
            ds_ref.as_str(),
            "{title} panel datasource"
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no target");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{title}: a target without expr"
            );
            assert_eq!(
                t["datasource"]["uid"],
                ds_ref.as_str(),
                "{title} target datasource"
            );
        }
    }
    assert_eq!(
        rows, 7,
        "overview, failover, probes, raft, clients, messages, process"
    );
    // Stat, gauge and state panels say what is good and bad: thresholds or value mappings,
    // so "Has leader = 0" is red, not green.
    for p in d["panels"].as_array().unwrap() {
        if ["stat", "gauge", "state-timeline"].contains(&p["type"].as_str().unwrap_or("")) {
            let defaults = &p["fieldConfig"]["defaults"];
            let steps = defaults["thresholds"]["steps"]
                .as_array()
                .map_or(0, Vec::len);
            let mappings = defaults["mappings"].as_array().map_or(0, Vec::len);
            assert!(
                steps + mappings > 0,
                "{} has neither thresholds nor mappings",
                p["title"]
            );
        }
    }
    let has_leader = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Has leader")
        .unwrap();
    let steps = &has_leader["fieldConfig"]["defaults"]["thresholds"]["steps"];
    assert_eq!(steps[0]["color"], "red", "no leader renders red");
    // A per-node leader timeline and an annotation on leader changes.
    assert!(
        dashboard_exprs(&d)
            .iter()
            .any(|(_, e)| e.starts_with("raftchat_raft_is_leader")),
        "no per-node leader timeline"
    );
    assert!(
        d["annotations"]["list"][0]["expr"]
            .as_str()
            .is_some_and(|e| e.contains("raftchat_raft_leader_changes_total")),
        "no annotation on leader changes"
    );
    // A `job` variable; no query is pinned to one job.
    assert!(vars.iter().any(|v| v["name"] == "job"), "no $job variable");
    for (title, expr) in dashboard_exprs(&d) {
        assert!(
            !expr.contains("job=\"raftchat\""),
            "{title} pins the job: {expr}"
        );
        // Latency quantiles per node: summed across nodes they hide the slow one.
        if expr.contains("histogram_quantile") && expr.contains("sum by") {
            assert!(
                expr.contains("sum by (instance"),
                "{title} mixes nodes: {expr}"
            );
        }
    }
    // Only `job`/`instance` matchers may be relied on; other variables only in =~.
    for (title, expr) in dashboard_exprs(&d) {
        for var in ["$instance", "$job"] {
            if expr.contains(var) {
                assert!(
                    expr.contains(&format!("=~\"{var}\"")),
                    "{title}: {var} outside =~: {expr}"
                );
            }
        }
    }
}

fn kubernetes_validate() -> PathBuf {
    // scripts/test installs the PyPI package into this virtualenv when it is missing.
    let venv = repo("target/test-venv/bin/kubernetes-validate");
    if venv.is_file() {
        return venv;
    }
    tool_or(
        "kubernetes-validate",
        "run scripts/test, which installs the PyPI package `kubernetes-validate`",
    )
}

fn tool_or(name: &str, how: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("`{name}` is not installed: {how}"))
}

fn manifests() -> Vec<(PathBuf, Value)> {
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(repo("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            docs.push((path.clone(), v));
        }
    }
    docs
}

#[test]
fn kubernetes_manifests_are_schema_valid_and_production_shaped() {
    // Strict schema validation of every built-in kind; the Prometheus Operator's kinds have
    // no bundled schema (the rules inside are checked by promtool above).
    let files: Vec<PathBuf> = std::fs::read_dir(repo("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let out = Command::new(kubernetes_validate())
        .arg("--strict")
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate --strict:\n{text}"
    );
    for line in text.lines().filter(|l| !l.starts_with("INFO")) {
        assert!(
            line.contains("PodMonitor") || line.contains("PrometheusRule"),
            "unexpected: {line}\n{text}"
        );
    }
    let docs = manifests();
    let kind = |k: &str| -> Vec<&Value> {
        docs.iter()
            .filter(|(_, v)| v["kind"] == k)
            .map(|(_, v)| v)
            .collect()
    };
    // No secret value is shipped: the user creates the Secret.
    assert!(
        kind("Secret").is_empty(),
        "a Secret with a literal value is shipped"
    );
    for (path, _) in &docs {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            !text.contains("change-me"),
            "{} ships an example secret",
            path.display()
        );
    }
    let sts = kind("StatefulSet");
    let pod = &sts[0]["spec"]["template"]["spec"];
    assert_eq!(
        pod["enableServiceLinks"], false,
        "service links collide with RAFTCHAT_*"
    );
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    let dockerfile = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let uid = psc["runAsUser"].as_u64().expect("numeric runAsUser");
    assert!(
        dockerfile.contains(&format!("--uid {uid}")) && dockerfile.contains(&format!("USER {uid}")),
        "the image's user is not uid {uid}"
    );
    assert_eq!(
        psc["fsGroup"].as_u64(),
        Some(uid),
        "a fresh volume must be writable"
    );
    let container = &pod["containers"][0];
    let csc = &container["securityContext"];
    assert_eq!(csc["readOnlyRootFilesystem"], true);
    assert_eq!(csc["allowPrivilegeEscalation"], false);
    assert_eq!(csc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    let env = container["env"].as_array().unwrap();
    let secret = env
        .iter()
        .find(|e| e["name"] == "RAFTCHAT_SECRET")
        .expect("RAFTCHAT_SECRET");
    assert!(secret["valueFrom"]["secretKeyRef"].is_object(), "{secret}");
    let pdb = kind("PodDisruptionBudget");
    assert_eq!(pdb[0]["spec"]["maxUnavailable"], 1);
    let policy = kind("NetworkPolicy");
    let raft_rule = policy[0]["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["port"] == 7100)
        })
        .expect("a rule for the raft port");
    assert_eq!(
        raft_rule["from"][0]["podSelector"]["matchLabels"]["app"],
        "raftchat"
    );
    // One Service per pod for clients outside the cluster.
    let per_pod: Vec<&Value> = kind("Service")
        .into_iter()
        .filter(|s| s["spec"]["selector"]["statefulset.kubernetes.io/pod-name"].is_string())
        .collect();
    assert_eq!(per_pod.len(), 3, "one external Service per node");
}

#[test]
fn compose_systemd_and_docker_files_hold_up() {
    // Compose: host clients are told the published ports, so they can fail over.
    let compose: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo("deploy/docker-compose.yml")).unwrap(),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(repo("deploy/compose/cluster.toml")).unwrap();
    let cfg: toml::Value = toml::from_str(&cfg).unwrap();
    assert!(cfg.get("secret").is_none(), "compose ships a secret value");
    for node in cfg["nodes"].as_array().unwrap() {
        let id = node["id"].as_integer().unwrap();
        let advertised = node["advertise_chat"].as_str().expect("advertise_chat");
        let port = advertised.rsplit(':').next().unwrap();
        let published = compose["services"][format!("node{id}")]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| {
                p.as_str()
                    .is_some_and(|p| p.starts_with(&format!("{port}:")))
            });
        assert!(
            published,
            "node {id} advertises {advertised}, not a published port"
        );
    }
    // systemd: start limits are [Unit] settings (ignored in [Service]).
    let unit = std::fs::read_to_string(repo("deploy/systemd/raftchat@.service")).unwrap();
    let mut section = "";
    for line in unit.lines() {
        if line.starts_with('[') {
            section = line;
        }
        if line.starts_with("StartLimit") {
            assert_eq!(section, "[Unit]", "{line} is in {section}");
        }
    }
    assert!(unit.contains("StartLimitIntervalSec"));
    // The build context leaves out build output.
    let ignore = std::fs::read_to_string(repo(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore
            .lines()
            .any(|l| l.trim() == "target/" || l.trim() == "target")
    );
}

#[test]
fn kubernetes_manifests_parse_and_carry_the_same_rules() {
    let dir = repo("deploy/k8s");
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            kinds.push(v["kind"].as_str().unwrap_or("").to_string());
            if v["kind"] == "PrometheusRule" {
                let alerts: Value = serde_norway::from_str(
                    &std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap(),
                )
                .unwrap();
                assert_eq!(
                    v["spec"], alerts,
                    "PrometheusRule drifted from alerts.yml: run scripts/gen-prometheusrule"
                );
            }
            if v["kind"] == "StatefulSet" {
                assert_eq!(v["spec"]["serviceName"], "raftchat");
            }
        }
    }
    for kind in [
        "StatefulSet",
        "Service",
        "ConfigMap",
        "PodMonitor",
        "PrometheusRule",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no {kind} in deploy/k8s: {kinds:?}"
        );
    }
    // The compose file and its configs parse too.
    for file in [
        "deploy/docker-compose.yml",
        "deploy/compose/prometheus.yml",
        "deploy/grafana/provisioning/datasources/prometheus.yml",
    ] {
        let _: Value =
            serde_norway::from_str(&std::fs::read_to_string(repo(file)).unwrap()).unwrap();
    }
    let cfg = std::fs::read_to_string(repo("deploy/compose/cluster.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), cfg).unwrap();
    // The compose config is valid: the node gets as far as binding (the names do not resolve here).
    let out = Command::new(BIN)
        .args(["node", "--config"])
        .arg(dir.path().join("c.toml"))
        .args(["--id", "9"])
        .env("RAFTCHAT_SECRET", "a-secret-from-the-environment")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "only the id is wrong: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--id"));
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn query(&self, expr: &str) -> Value {
        let (code, body) = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", urlencode(expr)),
        )
        .expect("query");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert!(
            code == 200 && v["status"] == "success",
            "query {expr} failed ({code}): {body}"
        );
        v
    }

    fn firing(&self, alert: &str) -> bool {
        let Ok((_, body)) = http_get(&self.addr, "/api/v1/alerts") else {
            return false;
        };
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        v["data"]["alerts"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["labels"]["alertname"] == alert && x["state"] == "firing")
        })
    }
}

/// A real Prometheus scraping `targets` every second with the shipped rules, whose `for:`
/// durations are cut to zero so the test need not wait minutes.
fn start_prometheus(targets: &[String]) -> Prometheus {
    let bin = tool("prometheus");
    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let retargeted: String = rules
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                l.split("for:").next().unwrap().to_string() + "for: 0s"
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("alerts.yml"), retargeted).unwrap();
    let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\nscrape_configs:\n  - job_name: raftchat\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        ),
    )
    .unwrap();
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(log)
        .current_dir(dir.path())
        .spawn()
        .expect("start prometheus");
    let p = Prometheus {
        child,
        addr,
        _dir: dir,
    };
    wait_for(T, "Prometheus to be ready", || {
        (http_get(&p.addr, "/-/ready").ok()?.0 == 200).then_some(())
    });
    p
}

#[test]
fn real_prometheus_runs_every_dashboard_query_and_fires_the_alerts() {
    let mut cluster = Cluster::start(
        3,
        "[health]\nprobe_interval_ms = 200\nprobe_timeout_ms = 200\n",
    );
    cluster.wait_leader(&[1, 2, 3], T);
    let targets: Vec<String> = cluster.nodes.iter().map(|n| n.metrics.clone()).collect();
    let prom = start_prometheus(&targets);
    // Some traffic, so client and message series move.
    let mut a = cluster.login(1, "promuser");
    a.join("#prom");
    for i in 0..5 {
        assert_eq!(a.say("#prom", &format!("p{i}"), "scraped")["type"], "ack");
    }
    wait_for(T, "three healthy targets with a few scrapes", || {
        let v = prom.query("count_over_time(up{job=\"raftchat\"}[1m])");
        let series = v["data"]["result"].as_array()?;
        let enough = series.len() == 3
            && series.iter().all(|s| {
                s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    >= 4.0
            });
        enough.then_some(())
    });

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("dashboards/raftchat-cluster.json")).unwrap(),
    )
    .unwrap();
    for (title, expr) in dashboard_exprs(&dashboard) {
        let concrete = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$instance", ".*")
            .replace("$job", "raftchat");
        let v = prom.query(&concrete);
        let n = v["data"]["result"].as_array().map_or(0, Vec::len);
        assert!(n > 0, "panel {title}: no series for {concrete}");
    }

    // Kill the leader again and again: the flapping alert fires.
    let mut rounds = 0;
    while !prom.firing("RaftchatLeaderFlapping") {
        rounds += 1;
        if rounds > 12 {
            let rules = http_get(&prom.addr, "/api/v1/rules").map(|r| r.1);
            panic!("RaftchatLeaderFlapping never fired; rules: {rules:?}");
        }
        let leader = cluster.wait_leader(&[1, 2, 3], T);
        let target = cluster.node(leader).metrics.clone();
        cluster.kill(leader);
        let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        cluster.wait_leader(&survivors, T);
        cluster.start_node(leader);
        cluster.wait_applied_equal(&[1, 2, 3], 1, T);
        // Prometheus has scraped the restarted process successfully (a sample stamped after
        // the restart), so no round's leader changes fall between two scrapes.
        // `process_start_time_seconds` is whole seconds: two quick restarts can share it.
        let restarted = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // `timestamp()` of a raw selector is the scrape's time; of `up == 1` it would be the
        // query's own (Prometheus 2.42), which let this wait pass at once and the rounds
        // outrun the scrapes.
        let up = format!("up{{job=\"raftchat\",instance=\"{target}\"}}");
        let scraped_at = format!("timestamp({up})");
        wait_for(T, "the restarted node scraped", || {
            let v = prom.query(&scraped_at);
            let at: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
            let v = prom.query(&up);
            let healthy = v["data"]["result"][0]["value"][1].as_str()? == "1";
            (at > restarted && healthy).then_some(())
        });
    }

    // One node down and kept down: the node-down alert fires.
    cluster.kill(3);
    let deadline = std::time::Instant::now() + T;
    while !prom.firing("RaftchatNodeDown") {
        if std::time::Instant::now() > deadline {
            let rules = http_get(&prom.addr, "/api/v1/rules").map(|r| r.1);
            let up = prom.query("up");
            panic!("RaftchatNodeDown did not fire; up: {up}; rules: {rules:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
