//! The Docker Swarm stack (`deploy/stack.yaml`), deployed for real on a single-node swarm.
//!
//! Makes this Docker engine a one-node swarm (`docker swarm init`, unless it already is
//! a swarm manager), labels the node for every placement constraint of the stack (all
//! three regions, every edge, the core), creates the two secrets with
//! `docker secret create`, and deploys the stack with `docker stack deploy` from the
//! `FROM scratch` image that `deploy/build-image.sh` builds. Then, only through the
//! ports the stack publishes (host mode, on 28xxx here):
//!
//! 1. every service becomes healthy (its HEALTHCHECK on `/readyz`) and both control
//!    nodes see the six edges alive and ready (gossip over the overlay network, each
//!    node advertising its own address found through `advertise_network`);
//! 2. every edge serves a cached object (MISS, then HIT);
//! 3. geo-DNS answers each region's client subnet (ECS) with that region's edges;
//! 4. a purge through control-2 is applied on all six edges, which then MISS;
//! 5. `deploy/swarm/routing.toml`, applied with `cdn routing apply --wait`, is served
//!    by every edge (`api.cdn.test` BYPASS, `utm_*` out of the cache key);
//! 6. a rolling update of edge us-1 (`docker service update --force`), drain first:
//!    `POST /v1/edges/us-1/drain`, geo stops handing it out, the task is replaced,
//!    the new one is healthy, `.../undrain`, geo hands it out again and it serves --
//!    while a client that resolves `www.cdn.test` through geo-DNS for every request
//!    and fetches from the edge it was given sees no failed request.
//!
//! The stack, its volumes, the secrets and the node labels are removed at the end,
//! also when a check fails (the last log lines of every service are printed first),
//! and the swarm is left (`docker swarm leave --force`) if this test created it.
//! Runs only where `docker info` works (otherwise it prints "skipped: no docker
//! daemon" and passes); `CDN_SKIP_DOCKER=1` skips it too. `CDN_BINARY=path` puts
//! another binary than the one cargo built for the tests into the image. See
//! docs/deploy.md#docker-swarm.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::sleep,
    time::{Duration, Instant},
};

use cdn_test_support::{
    curl::{Curl, curl_blocking},
    wait,
};
use serde_json::{Value, json};

/// The name clients use; purges by URL name it.
const HOST: &str = "www.cdn.test";
/// The image the test builds (not `cdn:local`, which a user or tests/docker.rs may use).
const DEFAULT_IMAGE: &str = "cdn:swarm-test";
/// Stacks of this test are called `<prefix><pid>`.
const STACK_PREFIX: &str = "cdnswarm";
/// The overlay network's subnet (deploy/stack.yaml, `advertise_network` in deploy/swarm/).
const CORE_SUBNET: &str = "10.211.0.0/24";
/// Published ports (host mode): control-1, control-2 and geo's DNS; the edges at
/// `EDGE_HTTP_BASE + octet` (http) and `EDGE_HTTPS_BASE + octet` (https, h3).
const CONTROL_PORTS: [u16; 2] = [28900, 28901];
const DNS_PORT: u16 = 28953;
const EDGE_HTTP_BASE: u16 = 28100;
const EDGE_HTTPS_BASE: u16 = 28400;

struct Edge {
    id: &'static str,
    region: &'static str,
    octet: u16,
}

const EDGES: [Edge; 6] = [
    Edge { id: "us-1", region: "us", octet: 21 },
    Edge { id: "us-2", region: "us", octet: 22 },
    Edge { id: "eu-1", region: "eu", octet: 31 },
    Edge { id: "eu-2", region: "eu", octet: 32 },
    Edge { id: "ap-1", region: "ap", octet: 41 },
    Edge { id: "ap-2", region: "ap", octet: 42 },
];

/// Each region's client subnet in deploy/swarm/geo.toml.
const REGIONS: [(&str, &str); 3] = [("us", "198.51.100.0/26"), ("eu", "198.51.100.64/26"), ("ap", "198.51.100.128/26")];

impl Edge {
    /// Its `public_addr` (deploy/swarm/<id>.toml): what geo-DNS hands out.
    fn public_ip(&self) -> String {
        format!("192.0.2.{}", self.octet)
    }

    fn http_port(&self) -> u16 {
        EDGE_HTTP_BASE + self.octet
    }

    fn env(&self) -> String {
        self.id.to_uppercase().replace('-', "_")
    }
}

fn region_edges(region: &str) -> BTreeSet<String> {
    EDGES.iter().filter(|e| e.region == region).map(Edge::public_ip).collect()
}

/// The edge a client reaches at `ip`: on one machine every edge has the machine's
/// address, so the test stands in for the network and maps each `public_addr` to
/// the edge's published port.
fn edge_at(ip: &str) -> Option<&'static Edge> {
    EDGES.iter().find(|e| e.public_ip() == ip)
}

// ---------------------------------------------------------------------------------
// Processes

fn output(command: &mut Command) -> Output {
    command.stdin(Stdio::null());
    command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Runs `command` and panics with its output unless it succeeds.
fn run(command: &mut Command) -> String {
    let out = output(command);
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docker(args: &[&str]) -> String {
    run(Command::new("docker").args(args))
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn step(name: &str, start: Instant) {
    eprintln!("swarm: [{:6.1} s] {name}", start.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------
// HTTP and DNS from the host

/// One request with curl (any certificate); `None` when no whole HTTP answer came.
fn curl(max_secs: u32, args: &[&str]) -> Option<Curl> {
    let max = max_secs.to_string();
    let mut all = vec!["-k", "--max-time", &max];
    all.extend_from_slice(args);
    let resp = curl_blocking(&all);
    resp.success.then_some(resp)
}

/// `GET path` on `edge` with `Host: host`, a new connection each time.
fn get(edge: &Edge, host: &str, path: &str) -> Option<Curl> {
    let url = format!("http://127.0.0.1:{}{path}", edge.http_port());
    curl(5, &["-H", &format!("Host: {host}"), &url])
}

/// geo-DNS's A records for `www.cdn.test` asked with EDNS Client Subnet `subnet`.
fn dig(subnet: &str, tcp: bool) -> Option<Vec<String>> {
    let port = DNS_PORT.to_string();
    let ecs = format!("+subnet={subnet}");
    let mut args = vec!["@127.0.0.1", "-p", &port, HOST, "A", &ecs, "+short", "+time=1", "+tries=1"];
    if tcp {
        args.push("+tcp");
    }
    let out = output(Command::new("dig").args(&args));
    let text = String::from_utf8_lossy(&out.stdout);
    (out.status.success() && !text.contains(";;")).then(|| text.lines().map(|l| l.trim().to_string()).collect())
}

fn dig_region(region: &str) -> Option<BTreeSet<String>> {
    let subnet = REGIONS.iter().find(|(r, _)| *r == region).map(|(_, s)| *s).expect("known region");
    dig(subnet, false).map(|v| v.into_iter().collect())
}

struct Api {
    token: String,
}

impl Api {
    fn call(&self, n: usize, method: &str, path: &str, body: Option<&Value>) -> Option<Curl> {
        let url = format!("http://127.0.0.1:{}{path}", CONTROL_PORTS[n - 1]);
        let auth = format!("Authorization: Bearer {}", self.token);
        let mut args = vec!["-X", method, "-H", &auth, &url];
        let body = body.map(Value::to_string);
        if let Some(body) = &body {
            args.extend(["-H", "Content-Type: application/json", "--data-binary", body]);
        }
        curl(10, &args)
    }

    fn nodes(&self, n: usize) -> Vec<Value> {
        self.call(n, "GET", "/v1/nodes", None)
            .filter(|r| r.status == 200)
            .and_then(|r| r.json().as_array().cloned())
            .unwrap_or_default()
    }

    fn wait_for_six_edges(&self, n: usize) {
        wait::blocking(
            &format!("six edges alive and ready in control-{n}'s view"),
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let nodes = self.nodes(n);
                EDGES
                    .iter()
                    .all(|e| nodes.iter().any(|v| v["node_id"] == e.id && v["state"] == "alive" && v["ready"] == true))
                    .then_some(())
            },
        );
    }

    fn post_ok(&self, n: usize, path: &str) {
        let resp = self.call(n, "POST", path, Some(&json!({}))).expect("control answered");
        assert!((200..300).contains(&resp.status), "POST {path}: {} {}", resp.status, resp.text());
    }
}

// ---------------------------------------------------------------------------------
// The swarm and the stack

/// Everything the test created; dropping it removes all of it.
struct Swarm {
    stack: String,
    /// This test ran `docker swarm init` (and so leaves the swarm at the end).
    initialised: bool,
    /// `docker_gwbridge` came with this test's swarm (removed after leaving it).
    own_gwbridge: bool,
    /// The node's labels this test added (removed at the end when the swarm stays).
    labels: Vec<String>,
    /// The node's id.
    node: String,
    secrets: Vec<String>,
}

impl Swarm {
    fn service(&self, name: &str) -> String {
        format!("{}_{name}", self.stack)
    }

    /// The running container of `service` that Docker reports healthy, if any.
    fn healthy_container(&self, service: &str) -> Option<String> {
        let filter = format!("label=com.docker.swarm.service.name={}", self.service(service));
        let out = docker(&["ps", "--filter", &filter, "--filter", "health=healthy", "-q"]);
        out.split_whitespace().next().map(str::to_string)
    }

    fn wait_all_healthy(&self, timeout: Duration) {
        let services = ["origin", "control-1", "control-2", "geo"]
            .into_iter()
            .chain(EDGES.iter().map(|e| e.id))
            .collect::<Vec<_>>();
        wait::blocking("every service's task running and healthy", timeout, Duration::from_millis(500), || {
            services.iter().all(|s| self.healthy_container(s).is_some()).then_some(())
        });
    }

    fn print_logs(&self) {
        eprintln!("--- swarm: tasks and last log lines of every service ---");
        let out = output(Command::new("docker").args([
            "stack",
            "ps",
            "--no-trunc",
            "--format",
            "{{.Name}} {{.CurrentState}} {{.Error}}",
            &self.stack,
        ]));
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        let services = output(Command::new("docker").args(["stack", "services", "--format", "{{.Name}}", &self.stack]));
        for service in String::from_utf8_lossy(&services.stdout).lines() {
            let out =
                output(Command::new("docker").args(["service", "logs", "--no-task-ids", "--tail", "25", service]));
            eprintln!("--- {service}");
            eprintln!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Removes stack `stack`, waits for its containers and network to go, then its
/// volumes.
fn remove_stack(stack: &str) {
    let _ = output(Command::new("docker").args(["stack", "rm", stack]));
    let filter = format!("label=com.docker.stack.namespace={stack}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let containers = output(Command::new("docker").args(["ps", "-a", "-q", "--filter", &filter]));
        let networks = output(Command::new("docker").args(["network", "ls", "-q", "--filter", &filter]));
        if containers.stdout.iter().all(u8::is_ascii_whitespace) && networks.stdout.iter().all(u8::is_ascii_whitespace)
        {
            break;
        }
        sleep(Duration::from_millis(500));
    }
    let volumes = output(Command::new("docker").args(["volume", "ls", "-q", "--filter", &filter]));
    let volumes = String::from_utf8_lossy(&volumes.stdout).into_owned();
    if !volumes.trim().is_empty() {
        let _ = output(Command::new("docker").args(["volume", "rm", "-f"]).args(volumes.split_whitespace()));
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        eprintln!("swarm: removing stack {} (services, network, volumes, secrets)", self.stack);
        remove_stack(&self.stack);
        for secret in &self.secrets {
            let _ = output(Command::new("docker").args(["secret", "rm", secret]));
        }
        if self.initialised {
            eprintln!("swarm: leaving the swarm this test created (docker swarm leave --force)");
            let out = output(Command::new("docker").args(["swarm", "leave", "--force"]));
            if !out.status.success() {
                eprintln!("swarm: leave failed: {}", String::from_utf8_lossy(&out.stderr));
            } else if self.own_gwbridge {
                let _ = output(Command::new("docker").args(["network", "rm", "docker_gwbridge"]));
            }
        } else if !self.labels.is_empty() {
            let mut cmd = Command::new("docker");
            cmd.args(["node", "update"]);
            for label in &self.labels {
                cmd.args(["--label-rm", label]);
            }
            let _ = output(cmd.arg(&self.node));
        }
    }
}

/// Removes the stacks of earlier runs whose process is gone (killed before their
/// cleanup): their network would overlap ours.
fn remove_stale_stacks() {
    let out = output(Command::new("docker").args(["stack", "ls", "--format", "{{.Name}}"]));
    for stack in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(pid) = stack.trim().strip_prefix(STACK_PREFIX) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("swarm: removing the leftovers of an earlier run, stack {stack}");
            remove_stack(stack.trim());
            for secret in ["api_token", "cluster_secret"] {
                let _ = output(Command::new("docker").args(["secret", "rm", &format!("{}_{secret}", stack.trim())]));
            }
        }
    }
}

/// Some unguessable text (for the token and the cluster secret).
fn random_text(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{what}-{nanos:x}-{hex}")
}

fn create_secret(name: &str, value: &str) {
    let mut child = Command::new("docker")
        .args(["secret", "create", name, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker runs");
    child.stdin.take().expect("stdin").write_all(value.as_bytes()).expect("secret written");
    let out = child.wait_with_output().expect("docker secret create");
    assert!(out.status.success(), "docker secret create {name}: {}", String::from_utf8_lossy(&out.stderr));
}

// ---------------------------------------------------------------------------------
// The rolling update's client

#[derive(Default)]
struct Tally {
    /// Successful answers by the edge that served them (`X-Served-By`).
    served: BTreeMap<String, u64>,
    /// What went wrong, one line per failed request.
    failures: Vec<String>,
    /// Answers from us-1 since `mark` was set.
    us1_after_mark: u64,
}

/// A client in the `us` region: for every request it asks geo-DNS for `www.cdn.test`
/// (its subnet sent as ECS, no caching), takes the answers in turn, and fetches
/// `/hello.txt` from that edge on a new connection. Runs until `stop`.
fn client_loop(stop: Arc<AtomicBool>, mark: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let failure = match dig(REGIONS[0].1, false) {
            None => Some("geo-DNS did not answer".to_string()),
            Some(answers) if answers.is_empty() => Some("geo-DNS answered with no edge".to_string()),
            Some(answers) => {
                let ip = &answers[n % answers.len()];
                match edge_at(ip) {
                    None => Some(format!("geo-DNS answered {ip}, no edge of the stack")),
                    Some(edge) => match get(edge, HOST, "/hello.txt") {
                        Some(resp) if resp.status == 200 => {
                            let by = resp.header("x-served-by").to_string();
                            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                            if by == "us-1" && mark.load(Ordering::SeqCst) {
                                t.us1_after_mark += 1;
                            }
                            *t.served.entry(by).or_default() += 1;
                            None
                        }
                        Some(resp) => Some(format!("{}: status {}", edge.id, resp.status)),
                        None => Some(format!("{}: no answer", edge.id)),
                    },
                }
            }
        };
        if let Some(failure) = failure {
            eprintln!("swarm: client: FAILED request {n}: {failure}");
            tally.lock().unwrap_or_else(|e| e.into_inner()).failures.push(failure);
        }
        sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------

#[test]
fn swarm_stack() {
    if std::env::var_os("CDN_SKIP_DOCKER").is_some_and(|v| v != "0" && !v.is_empty()) {
        eprintln!("skipped: CDN_SKIP_DOCKER is set");
        return;
    }
    if !succeeds("docker", &["info"]) {
        eprintln!("skipped: no docker daemon (`docker info` fails)");
        return;
    }
    for tool in ["curl", "dig"] {
        assert!(
            succeeds("sh", &["-c", &format!("command -v {tool}")]),
            "{tool} is needed (scripts/test-deps.sh installs it)"
        );
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let image = std::env::var("CDN_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.into());
    let binary = std::env::var("CDN_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cdn").to_string());
    let t0 = Instant::now();

    run(Command::new(root.join("deploy/build-image.sh"))
        .env("CDN_IMAGE", &image)
        .env("CDN_BINARY", &binary)
        .current_dir(&root));
    step(&format!("image {image} built"), t0);

    // The swarm: this engine's, or a new single-node one.
    let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}"]);
    let own_gwbridge = !succeeds("docker", &["network", "inspect", "docker_gwbridge"]);
    let initialised = match state.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["active", "true"] => false,
        ["inactive", ..] => {
            docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
            true
        }
        other => panic!("this docker engine is in a swarm it cannot deploy to (state {other:?}): not a manager"),
    };
    let stack = format!("{STACK_PREFIX}{}", std::process::id());
    let mut swarm = Swarm {
        stack: stack.clone(),
        initialised,
        own_gwbridge: initialised && own_gwbridge,
        labels: Vec::new(),
        node: String::new(),
        secrets: Vec::new(),
    };
    // From here on, `swarm` going out of scope (also by a failed check) removes it all.
    step(&format!("swarm ready ({})", if initialised { "docker swarm init" } else { "already a manager" }), t0);

    remove_stale_stacks();
    let networks = docker(&["network", "ls", "-q"]);
    let subnets = docker(
        &["network", "inspect", "-f", "{{.Name}} {{range .IPAM.Config}}{{.Subnet}} {{end}}"]
            .into_iter()
            .chain(networks.split_whitespace())
            .collect::<Vec<_>>(),
    );
    let taken: Vec<&str> = subnets.lines().filter(|l| l.contains(" 10.211.0.")).collect();
    assert!(taken.is_empty(), "docker networks already use the stack's subnet {CORE_SUBNET}: {taken:?}");

    // Labels: this one node is every region's machine, every edge's and the core's.
    let mut labels = vec!["cdn.core".to_string(), "cdn.control-1".into(), "cdn.control-2".into()];
    labels.extend(["us", "eu", "ap"].iter().map(|r| format!("cdn.region.{r}")));
    labels.extend(EDGES.iter().map(|e| format!("cdn.edge.{}", e.id)));
    let mut update = Command::new("docker");
    update.args(["node", "update"]);
    for label in &labels {
        update.args(["--label-add", &format!("{label}=true")]);
    }
    let node = docker(&["info", "--format", "{{.Swarm.NodeID}}"]).trim().to_string();
    run(update.arg(&node));
    swarm.labels = labels;
    swarm.node = node;

    // Secrets, created the way an operator would.
    let token = random_text("token");
    let token_secret = format!("{stack}_api_token");
    let cluster_secret = format!("{stack}_cluster_secret");
    create_secret(&token_secret, &token);
    swarm.secrets.push(token_secret.clone());
    create_secret(&cluster_secret, &random_text("cluster"));
    swarm.secrets.push(cluster_secret.clone());

    // Deploy.
    let mut deploy = Command::new("docker");
    deploy
        .args(["stack", "deploy", "--resolve-image", "never", "--prune", "-c"])
        .arg(root.join("deploy/stack.yaml"))
        .arg(&stack)
        .current_dir(&root)
        .env("CDN_IMAGE", &image)
        .env("CDN_TOKEN_SECRET", &token_secret)
        .env("CDN_CLUSTER_SECRET", &cluster_secret)
        .env("CDN_PORT_DNS", DNS_PORT.to_string())
        .env("CDN_PORT_CONTROL_1", CONTROL_PORTS[0].to_string())
        .env("CDN_PORT_CONTROL_2", CONTROL_PORTS[1].to_string());
    for e in &EDGES {
        deploy.env(format!("CDN_PORT_{}_HTTP", e.env()), e.http_port().to_string());
        deploy.env(format!("CDN_PORT_{}_HTTPS", e.env()), (EDGE_HTTPS_BASE + e.octet).to_string());
    }
    run(&mut deploy);
    step(&format!("docker stack deploy {stack} returned"), t0);

    // 1. Healthy, and one cluster over the overlay network.
    swarm.wait_all_healthy(Duration::from_secs(120));
    step("every service's task healthy (HEALTHCHECK on /readyz)", t0);
    let api = Api { token };
    for n in [1, 2] {
        api.wait_for_six_edges(n);
    }
    let nodes = api.nodes(1);
    for node in &nodes {
        let addr = node["gossip_addr"].as_str().unwrap_or_default();
        assert!(addr.starts_with("10.211.0."), "gossip address on the overlay network {CORE_SUBNET}: {node}");
    }
    step(&format!("control-1 and control-2 see six edges alive and ready ({} members)", nodes.len()), t0);

    // 2. Caching.
    for e in &EDGES {
        let first = get(e, HOST, "/hello.txt").expect("edge answers");
        assert_eq!((first.status, first.x_cache()), (200, "MISS"), "{} first", e.id);
        assert_eq!(first.header("x-served-by"), e.id);
        let second = get(e, HOST, "/hello.txt").expect("edge answers");
        assert_eq!((second.status, second.x_cache()), (200, "HIT"), "{} second", e.id);
        let https = format!("https://127.0.0.1:{}/hello.txt", EDGE_HTTPS_BASE + e.octet);
        let tls = curl(5, &["-H", &format!("Host: {HOST}"), &https]).expect("https answers");
        assert_eq!(tls.status, 200, "{} over https", e.id);
    }
    step("every edge: MISS then HIT (http), 200 over https", t0);

    // 3. geo-DNS by client subnet.
    for (region, subnet) in REGIONS {
        let want = region_edges(region);
        wait::blocking(
            &format!("geo answers {region}'s subnet with its edges"),
            Duration::from_secs(10),
            Duration::from_millis(200),
            || dig_region(region).filter(|a| *a == want),
        );
        let tcp: Option<BTreeSet<String>> = dig(subnet, true).map(|v| v.into_iter().collect());
        assert_eq!(tcp, Some(want), "{region} over TCP");
    }
    step("geo-DNS: each region's subnet gets its two edges (UDP and TCP)", t0);

    // 4. A purge through control-2 reaches all six edges.
    let resp = api
        .call(2, "POST", "/v1/purge", Some(&json!({ "urls": [format!("https://{HOST}/hello.txt")] })))
        .expect("purge answered");
    assert_eq!(resp.status, 202, "purge: {}", resp.text());
    let id = resp.json()["id"].as_str().expect("purge id").to_string();
    let status = wait::blocking(
        &format!("purge {id} applied on all six edges"),
        Duration::from_secs(15),
        Duration::from_millis(50),
        || {
            let status = api.call(2, "GET", &format!("/v1/purge/{id}"), None).filter(|r| r.status == 200)?.json();
            (status["status"] == "complete" && EDGES.iter().all(|e| status["edges"][e.id] == "applied"))
                .then_some(status)
        },
    );
    for e in &EDGES {
        let resp = get(e, HOST, "/hello.txt").expect("edge answers");
        assert_eq!(resp.x_cache(), "MISS", "{} after the purge", e.id);
    }
    step(&format!("purge {id} applied on all six edges in {} ms, each MISSes", status["completed_ms"]), t0);

    // 5. The routing document.
    let out = run(Command::new(&binary)
        .args(["routing", "apply", "deploy/swarm/routing.toml", "--wait", "--control"])
        .arg(format!("http://127.0.0.1:{}", CONTROL_PORTS[0]))
        .args(["--token", &api.token])
        .current_dir(&root));
    eprint!("{out}");
    for e in &EDGES {
        let api_site = get(e, "api.cdn.test", "/hello.txt").expect("edge answers");
        assert_eq!((api_site.status, api_site.x_cache()), (200, "BYPASS"), "{}: api.cdn.test", e.id);
        let a = get(e, HOST, "/index.html?utm_source=a").expect("edge answers");
        let b = get(e, HOST, "/index.html?utm_source=b").expect("edge answers");
        assert_eq!((a.x_cache(), b.x_cache()), ("MISS", "HIT"), "{}: utm_* out of the key", e.id);
    }
    step("routing document applied and served by on all six edges", t0);

    // 6. Rolling update of us-1, drain first, under a client that follows geo-DNS.
    let us1 = &EDGES[0];
    let before = swarm.healthy_container(us1.id).expect("us-1 running");
    let stop = Arc::new(AtomicBool::new(false));
    let mark = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let client = {
        let (stop, mark, tally) = (stop.clone(), mark.clone(), tally.clone());
        std::thread::spawn(move || client_loop(stop, mark, tally))
    };
    sleep(Duration::from_secs(2));
    let t_update = Instant::now();
    api.post_ok(1, "/v1/edges/us-1/drain");
    wait::blocking(
        "geo stops handing out the drained us-1",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || dig_region("us").filter(|a| !a.is_empty() && !a.contains(&us1.public_ip())),
    );
    step("us-1 drained: geo no longer hands it out", t0);
    // A real client may hold the old answer for the DNS TTL (30 s): an operator waits
    // that long before the update. This client asks for every request.
    sleep(Duration::from_secs(1));
    run(Command::new("docker")
        .args(["service", "update", "--force", "--no-resolve-image", "--detach"])
        .arg(swarm.service(us1.id)));
    let after = wait::blocking("a new us-1 task, healthy", Duration::from_secs(90), Duration::from_millis(250), || {
        swarm.healthy_container(us1.id).filter(|c| *c != before)
    });
    step(&format!("us-1 replaced (container {} -> {}), new task healthy", &before[..12], &after[..12]), t0);
    api.post_ok(1, "/v1/edges/us-1/undrain");
    wait::blocking("geo hands out us-1 again", Duration::from_secs(10), Duration::from_millis(100), || {
        dig_region("us").filter(|a| a.contains(&us1.public_ip()))
    });
    mark.store(true, Ordering::SeqCst);
    wait::blocking("the client served by the new us-1", Duration::from_secs(20), Duration::from_millis(100), || {
        (tally.lock().unwrap_or_else(|e| e.into_inner()).us1_after_mark >= 5).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");
    let tally = tally.lock().unwrap_or_else(|e| e.into_inner());
    let total: u64 = tally.served.values().sum();
    eprintln!(
        "swarm: rolling update of us-1 took {:.1} s; the client made {} requests ({:?}), {} failed",
        t_update.elapsed().as_secs_f64(),
        total + tally.failures.len() as u64,
        tally.served,
        tally.failures.len()
    );
    assert!(tally.failures.is_empty(), "failed requests during the rolling update: {:?}", tally.failures);
    assert!(tally.served.get("us-2").copied().unwrap_or(0) > 0, "us-2 served while us-1 was replaced");
    // The new us-1 serves by the routing document and knows the purge (from its
    // disk tier and the control nodes), as the old one did.
    let api_site = get(us1, "api.cdn.test", "/hello.txt").expect("new us-1 answers");
    assert_eq!(api_site.x_cache(), "BYPASS", "new us-1 routes api.cdn.test");
    let nodes = api.nodes(1);
    let us1_node = nodes.iter().find(|v| v["node_id"] == "us-1").expect("us-1 in the view");
    assert_eq!(us1_node["state"], "alive", "{us1_node}");
    step("rolling update of us-1: no failed request", t0);
    drop(swarm);
    step("stack removed", t0);
}
