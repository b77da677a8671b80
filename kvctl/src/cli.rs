//! kvctl: data commands (get, put, delete, scan), cluster views (ranges, status), admin (split)
//! and bench. Human tables by default, `--output json` for scripts.

use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use kvfleet_proto::display_key;
use kvfleet_proto::v1::controller_client::ControllerClient;
use kvfleet_proto::v1::{
    ControllerStatusRequest, Durability, LoadReportRequest, NodeInfoRequest, RangeDescriptor, ReserveRangeIdsRequest,
    SplitRangeRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use crate::bench::{self, BenchArgs, BenchReport};
use kvfleet_client::{Client, ClientConfig, ClientError};
use kvfleet_view::{human_bytes, table};

#[derive(Debug, Parser)]
#[command(name = "kvctl", version, about = "Talk to a kvfleet cluster")]
pub struct Cli {
    /// Node addresses to start from (comma-separated host:port).
    #[arg(long, global = true, env = "KVFLEET_ENDPOINTS", value_delimiter = ',', default_value = "127.0.0.1:7700")]
    pub endpoints: Vec<String>,
    #[arg(long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// Deadline of each operation, retries included, in seconds.
    #[arg(long, global = true, default_value_t = 10.0)]
    pub timeout: f64,
    /// The cluster's admin token, for `split` and `merge` on nodes that require one (on
    /// Kubernetes: the `token` of the Secret `<cluster>-admin-token`).
    #[arg(long, global = true, env = "KVFLEET_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The resharding loop's status API. `status` adds what the loop does and declines to do;
    /// `split` takes the new range's id from it (without this flag it tries the playground's,
    /// 127.0.0.1:7690, and if it does not answer the node picks a random id).
    #[arg(long, global = true, env = "KVFLEET_CONTROLLER")]
    pub controller: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a key.
    Get { key: String },
    /// Write a key.
    Put { key: String, value: String },
    /// Delete a key.
    Delete { key: String },
    /// List pairs in [start, end) in key order, across ranges.
    Scan {
        #[arg(long, default_value = "")]
        start: String,
        /// Exclusive; empty = to the end of the key space.
        #[arg(long, default_value = "")]
        end: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        keys_only: bool,
    },
    /// The cluster's range map: which node owns which key range.
    Ranges,
    /// Split the range holding KEY so that KEY starts the right half.
    Split {
        key: String,
        /// Refuse unless the range is at this generation.
        #[arg(long)]
        expected_generation: Option<u64>,
    },
    /// Merge the range holding KEY with the range right after it, with replicas on the same
    /// nodes, through their Raft logs (the right range is frozen, then taken by the left;
    /// interrupted, it is finished by running it again). The left range keeps its id.
    Merge { key: String },
    /// Undo the freeze of range RANGE_ID, frozen for a merge that cannot finish (a replica's
    /// node is lost): the merge is refused for good through the left range's log and the range
    /// serves again. Every replica's node must answer that it can apply that, except the ones
    /// named here. The controller does this on its own for nodes down past its patience; this
    /// is for what it cannot decide.
    AbortMerge {
        range_id: u64,
        /// A node down for good that need not answer; it must have been last heard running a
        /// version that applies the undo.
        #[arg(long)]
        lost: Vec<String>,
        /// A node whose disk is destroyed (it will never run again with its data): need not
        /// answer, whatever version it last ran. Back with its old disk, its copy would stay
        /// frozen: wipe its disk before it runs again.
        #[arg(long)]
        decommissioned: Vec<String>,
    },
    /// Move the replica of the range holding KEY from one node to another (both in
    /// --endpoints): added as a learner, caught up, then swapped in by one joint membership
    /// change (a single copy's one voter hands its leadership over inside it); no write waits.
    /// Interrupted, it is finished by running it again.
    MoveReplica {
        key: String,
        /// The node id of the replica to move.
        #[arg(long)]
        from: String,
        /// The node id of the node to move it to (it holds no replica of the range).
        #[arg(long)]
        to: String,
    },
    /// Nodes, their ranges, load and hot keys; with --controller, also what the resharding loop
    /// is doing and declining to do (moves in flight, hot keys, reasons).
    Status,
    /// Run a YCSB-style benchmark.
    Bench(BenchArgs),
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Failed(String),
    #[error("rpc to {address} failed: {status}")]
    Rpc { address: String, status: tonic::Status },
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Serialize)]
struct RangeView {
    range_id: u64,
    start: String,
    end: String,
    generation: u64,
    state: String,
    /// The leader (or only owner), as the node that reported the range knows it.
    owner: String,
    address: String,
    /// A replicated range's replicas (node ids), the leader first.
    replicas: Vec<String>,
    /// How many log entries each replica lacks, by node id, as the range's leader reported it
    /// (empty if the report did not come from the leader).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    behind_entries: std::collections::BTreeMap<String, u64>,
}

impl RangeView {
    fn end_or_inf(&self) -> String {
        if self.end.is_empty() { "+inf".to_string() } else { self.end.clone() }
    }

    /// The replicas column: the leader first, each follower with how far behind it is.
    fn replicas_text(&self) -> String {
        if self.replicas.len() < 2 {
            return self.replicas.len().to_string();
        }
        let described: Vec<String> = self
            .replicas
            .iter()
            .map(|node| match self.behind_entries.get(node) {
                _ if *node == self.owner => format!("{node} (leader)"),
                Some(behind) => format!("{node} ({behind} behind)"),
                None => node.clone(),
            })
            .collect();
        described.join(", ")
    }

    fn print_line(&self) {
        println!(
            "range {} [{}, {}) generation {} on {}",
            self.range_id,
            self.start,
            self.end_or_inf(),
            self.generation,
            self.owner
        );
    }
}

impl From<&RangeDescriptor> for RangeView {
    fn from(d: &RangeDescriptor) -> Self {
        let leader = d.leader();
        RangeView {
            range_id: d.range_id,
            start: display_key(&d.start_key),
            end: if d.end_key.is_empty() { String::new() } else { display_key(&d.end_key) },
            generation: d.generation,
            state: format!("{:?}", d.state()),
            owner: leader.map(|l| l.node_id.clone()).unwrap_or_default(),
            address: leader.map(|l| l.address.clone()).unwrap_or_default(),
            replicas: {
                let mut replicas: Vec<&kvfleet_proto::v1::Replica> = d.replicas.iter().collect();
                replicas.sort_by_key(|r| r.role() != kvfleet_proto::v1::ReplicaRole::Leader);
                replicas.iter().map(|r| r.node_id.clone()).collect()
            },
            behind_entries: d
                .replicas
                .iter()
                .filter_map(|r| r.behind_entries.map(|behind| (r.node_id.clone(), behind)))
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct NodeStatus {
    node_id: String,
    address: String,
    reachable: bool,
    error: Option<String>,
    durability: String,
    uptime_seconds: u64,
    ranges: Vec<RangeStatus>,
}

#[derive(Serialize)]
struct RangeStatus {
    range: RangeView,
    reads_per_sec: f64,
    writes_per_sec: f64,
    bytes_per_sec: f64,
    approx_size_bytes: u64,
    approx_keys: u64,
    hot_keys: Vec<(String, f64)>,
}

fn print_json(value: &impl Serialize) -> Result<(), CliError> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    if !(cli.timeout > 0.0 && cli.timeout.is_finite()) {
        return Err(CliError::Failed(format!("--timeout must be a positive number of seconds, got {}", cli.timeout)));
    }
    let deadline = Duration::from_secs_f64(cli.timeout);
    let mut config = ClientConfig::new(cli.endpoints.iter().cloned());
    config.deadline = deadline;
    if let Some(token) = cli.admin_token.as_deref() {
        config.admin_token = kvfleet_proto::admin_auth::AdminToken::new(token)
            .map_err(|e| CliError::Failed(format!("--admin-token (KVFLEET_ADMIN_TOKEN): {e}")))?;
    }
    let admin_token = config.admin_token.clone();
    let client = Client::new(config)?;
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Get { key } => {
            let value = client.get(Bytes::from(key.clone())).await?;
            if json {
                #[derive(Serialize)]
                struct Got {
                    key: String,
                    found: bool,
                    value: Option<String>,
                }
                let value = value.map(|v| String::from_utf8_lossy(&v).into_owned());
                print_json(&Got { key, found: value.is_some(), value })?;
            } else {
                match value {
                    Some(value) => println!("{}", String::from_utf8_lossy(&value)),
                    None => return Err(CliError::Failed(format!("key {key:?} not found"))),
                }
            }
        }
        Command::Put { key, value } => {
            client.put(Bytes::from(key), Bytes::from(value)).await?;
            if json { print_json(&serde_json::json!({"ok": true}))? } else { println!("OK") }
        }
        Command::Delete { key } => {
            client.delete(Bytes::from(key)).await?;
            if json { print_json(&serde_json::json!({"ok": true}))? } else { println!("OK") }
        }
        Command::Scan { start, end, limit, keys_only } => {
            let pairs = client.scan(Bytes::from(start), Bytes::from(end), limit, keys_only).await?;
            if json {
                let rows: Vec<_> = pairs
                    .iter()
                    .map(|kv| serde_json::json!({"key": display_key(&kv.key), "value": String::from_utf8_lossy(&kv.value)}))
                    .collect();
                print_json(&rows)?;
            } else {
                let mut out = table(&["key", "value"]);
                for kv in &pairs {
                    out.add_row(vec![display_key(&kv.key), String::from_utf8_lossy(&kv.value).into_owned()]);
                }
                println!("{out}\n{} pairs", pairs.len());
            }
        }
        Command::Ranges => {
            client.refresh(std::time::Instant::now()).await?;
            let ranges: Vec<RangeView> = client.cached_ranges().iter().map(RangeView::from).collect();
            if json {
                print_json(&ranges)?;
            } else {
                let mut out = table(&["range", "start", "end", "gen", "state", "leader", "address", "replicas"]);
                for r in &ranges {
                    let end = r.end_or_inf();
                    out.add_row(vec![
                        r.range_id.to_string(),
                        r.start.clone(),
                        end,
                        r.generation.to_string(),
                        r.state.clone(),
                        r.owner.clone(),
                        r.address.clone(),
                        r.replicas_text(),
                    ]);
                }
                println!("{out}");
            }
        }
        Command::Split { key, expected_generation } => {
            split(&client, cli.controller.as_deref(), key, expected_generation, json).await?
        }
        Command::Merge { key } => merge(&client, admin_token, key, json).await?,
        Command::AbortMerge { range_id, lost, decommissioned } => {
            abort_merge(&cli.endpoints, admin_token, range_id, [lost.as_slice(), decommissioned.as_slice()], json)
                .await?
        }
        Command::Status => status(&client, cli.controller.as_deref(), json).await?,
        Command::MoveReplica { key, from, to } => {
            move_replica(&client, &cli.endpoints, admin_token, [&key, &from, &to], json).await?
        }
        Command::Bench(args) => {
            let report = bench::run(&args, &cli.endpoints, deadline).await.map_err(CliError::Failed)?;
            if json {
                print_json(&report)?
            } else {
                print_bench(&report)
            }
            if report.errors > 0 || report.verify_failures > 0 {
                return Err(CliError::Failed(format!(
                    "{} errors and {} verification failures; first: {}",
                    report.errors,
                    report.verify_failures,
                    report.first_problem.unwrap_or_default()
                )));
            }
        }
    }
    Ok(())
}

/// The freshly read range map, and the range in it that holds `key`.
async fn range_holding(client: &Client, key: &[u8]) -> Result<(Vec<RangeDescriptor>, RangeDescriptor), CliError> {
    client.refresh(std::time::Instant::now()).await?;
    let ranges = client.cached_ranges();
    let range = ranges
        .iter()
        .find(|r| kvfleet_proto::RangeBounds::contains_key(*r, key))
        .cloned()
        .ok_or_else(|| CliError::Failed(format!("no node reports a range holding {}", display_key(key))))?;
    Ok((ranges, range))
}

/// The playground's status API, where `split` and `merge` look for range ids by default.
const PLAYGROUND_CONTROLLER: &str = "127.0.0.1:7690";

/// `count` fresh range ids for a change on the node at `node_address`, from the resharding loop
/// at `controller` (default: the playground's). None: no loop answers at the default address, so
/// the node picks random ids (unique without a loop; only a loop keeps ids in order).
async fn reserve_range_ids(controller: Option<&str>, node_address: &str, count: u32) -> Result<Option<u64>, CliError> {
    let address = controller.unwrap_or(PLAYGROUND_CONTROLLER);
    let answer = async {
        let mut api = status_api(address)
            .await
            .map_err(|(code, what, error)| tonic::Status::new(code, format!("{what}: {error}")))?;
        let mut request = tonic::Request::new(ReserveRangeIdsRequest { count, node_address: node_address.to_string() });
        request.set_timeout(Duration::from_secs(30));
        api.reserve_range_ids(request).await.map(tonic::Response::into_inner)
    }
    .await;
    match answer {
        Ok(reserved) => Ok(Some(reserved.first)),
        Err(status) if controller.is_some() => Err(CliError::Rpc { address: address.to_string(), status }),
        Err(status) => {
            eprintln!(
                "kvctl: no resharding loop gave range ids at {address} ({}); the node picks random ones \
                 (--controller names the loop)",
                status.message()
            );
            Ok(None)
        }
    }
}

async fn split(
    client: &Client,
    controller: Option<&str>,
    key: String,
    expected_generation: Option<u64>,
    json: bool,
) -> Result<(), CliError> {
    let key = Bytes::from(key);
    let (_, range) = range_holding(client, &key).await?;
    let address = range.leader().map(|l| l.address.clone()).unwrap_or_default();
    // The range keeps its id for the left half: one new id, for the right one.
    let right_id = reserve_range_ids(controller, &address, 1).await?.unwrap_or(0);
    let request = SplitRangeRequest {
        range_id: range.range_id,
        expected_generation: expected_generation.unwrap_or(range.generation),
        split_key: key,
        right_id,
    };
    let response = client
        .admin(&address)?
        .split_range(request)
        .await
        .map_err(|status| CliError::Rpc { address: address.clone(), status })?
        .into_inner();
    let halves: Vec<RangeView> = [response.left, response.right].iter().flatten().map(RangeView::from).collect();
    if json {
        print_json(&halves)?;
    } else {
        halves.iter().for_each(RangeView::print_line);
    }
    Ok(())
}

/// How long `move-replica` goes on trying (a snapshot of a large range takes a while).
const MOVE_REPLICA_DEADLINE: Duration = Duration::from_secs(600);

async fn move_replica(
    client: &Client,
    endpoints: &[String],
    admin_token: kvfleet_proto::admin_auth::AdminToken,
    [key, from, to]: [&str; 3],
    json: bool,
) -> Result<(), CliError> {
    let (_, range) = range_holding(client, key.as_bytes()).await?;
    // Node ids to addresses, from the endpoints (the target holds no replica, so no range names it).
    let mut addresses = std::collections::HashMap::new();
    for address in endpoints {
        let Ok(mut admin) = client.admin(address) else { continue };
        let mut request = tonic::Request::new(NodeInfoRequest {});
        request.set_timeout(Duration::from_secs(2));
        if let Ok(info) = admin.node_info(request).await {
            addresses.insert(info.into_inner().node_id, address.clone());
        }
    }
    let endpoint = |node: &str| {
        let address = addresses.get(node).cloned().ok_or_else(|| {
            CliError::Failed(format!(
                "no endpoint answers as node {node:?} (answering: {:?})",
                addresses.keys().collect::<Vec<_>>()
            ))
        })?;
        Ok::<_, CliError>(kvfleet_resharding::replica_moves::Endpoint { node_id: node.to_string(), address })
    };
    let (source, target) = (endpoint(from)?, endpoint(to)?);
    let clients = kvfleet_resharding::observe::NodeClients::new(Default::default(), admin_token);
    let started = std::time::Instant::now();
    let moved = kvfleet_resharding::replica_moves::move_replica(
        &clients,
        range.range_id,
        endpoints,
        &source,
        &target,
        MOVE_REPLICA_DEADLINE,
    )
    .await
    .map_err(|e| CliError::Failed(e.to_string()))?;
    let view = RangeView::from(&moved);
    if json {
        print_json(&view)?;
    } else {
        println!(
            "range {} [{}, {}) generation {}: replicas {} (moved in {:.1} s)",
            view.range_id,
            view.start,
            view.end_or_inf(),
            view.generation,
            view.replicas_text(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

async fn merge(
    client: &Client,
    admin_token: kvfleet_proto::admin_auth::AdminToken,
    key: String,
    json: bool,
) -> Result<(), CliError> {
    let (ranges, left) = range_holding(client, key.as_bytes()).await?;
    let left = &left;
    if left.end_key.is_empty() {
        return Err(CliError::Failed(format!(
            "range {} {} is the last range: nothing after it",
            left.range_id,
            left.span()
        )));
    }
    let right = ranges
        .iter()
        .find(|r| r.start_key == left.end_key)
        .ok_or_else(|| CliError::Failed(format!("no node reports the range after {}", left.span())))?;
    merge_replicated(admin_token, left, right, json).await
}

/// Undoes range `range_id`'s freeze for a merge (`kvfleet_resharding::replica_merges`), asking
/// the nodes at `endpoints`; `[lost, decommissioned]` node ids.
async fn abort_merge(
    endpoints: &[String],
    admin_token: kvfleet_proto::admin_auth::AdminToken,
    range_id: u64,
    [lost, decommissioned]: [&[String]; 2],
    json: bool,
) -> Result<(), CliError> {
    let clients = kvfleet_resharding::observe::NodeClients::new(Default::default(), admin_token);
    let started = std::time::Instant::now();
    let thawed = kvfleet_resharding::replica_merges::abort_frozen_merge(
        &clients,
        range_id,
        lost,
        decommissioned,
        endpoints,
        MERGE_REPLICATED_DEADLINE,
    )
    .await
    .map_err(CliError::Failed)?;
    let view = RangeView::from(&thawed.range);
    if json {
        print_json(&view)?;
    } else {
        view.print_line();
        if thawed.by_this_call {
            println!("(its freeze undone in {:.2} s: it serves again)", started.elapsed().as_secs_f64());
        } else {
            println!("(range {range_id} is not frozen for a merge: nothing to undo)");
        }
    }
    Ok(())
}

/// How long `merge` and `abort-merge` go on trying (a replica down holds a merge up).
const MERGE_REPLICATED_DEADLINE: Duration = Duration::from_secs(60);

/// Merges two ranges through their logs (`kvfleet_resharding::replica_merges`): their replicas
/// must be on the same nodes already (`kvctl move-replica` puts them there).
async fn merge_replicated(
    admin_token: kvfleet_proto::admin_auth::AdminToken,
    left: &RangeDescriptor,
    right: &RangeDescriptor,
    json: bool,
) -> Result<(), CliError> {
    let seeds: Vec<String> = left.replicas.iter().chain(&right.replicas).map(|r| r.address.clone()).collect();
    let clients = kvfleet_resharding::observe::NodeClients::new(Default::default(), admin_token);
    let started = std::time::Instant::now();
    let merged = kvfleet_resharding::replica_merges::merge_replicated(
        &clients,
        left.range_id,
        right.range_id,
        &seeds,
        MERGE_REPLICATED_DEADLINE,
    )
    .await
    .map_err(|e| CliError::Failed(e.to_string()))?;
    let view = RangeView::from(&merged);
    if json {
        print_json(&view)?;
    } else {
        view.print_line();
        println!("(merged through the ranges' logs in {:.2} s)", started.elapsed().as_secs_f64());
    }
    Ok(())
}

async fn status(client: &Client, controller: Option<&str>, json: bool) -> Result<(), CliError> {
    if let Some(address) = controller {
        return controller_status(address, json).await;
    }
    // Learn every node first (owners, and every replica of a replicated range), then ask each
    // for its info and load.
    let _ = client.refresh(std::time::Instant::now()).await;
    let mut addresses = client.known_nodes();
    let replicas = client.cached_ranges().into_iter().flat_map(|d| d.replicas).map(|r| r.address);
    for address in replicas.filter(|a| !a.is_empty()) {
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    addresses.sort();
    let mut nodes = Vec::new();
    for address in addresses {
        nodes.push(node_status(client, &address).await);
    }
    if json {
        return print_json(&nodes);
    }
    let mut node_table =
        table(&["node", "address", "state", "durability", "ranges", "reads/s", "writes/s", "size on disk", "uptime"]);
    for node in &nodes {
        let sum = |f: fn(&RangeStatus) -> f64| node.ranges.iter().map(f).sum::<f64>();
        let state = match &node.error {
            None => "up".to_string(),
            Some(error) => format!("DOWN: {error}"),
        };
        node_table.add_row(vec![
            node.node_id.clone(),
            node.address.clone(),
            state,
            node.durability.clone(),
            node.ranges.len().to_string(),
            format!("{:.0}", sum(|r| r.reads_per_sec)),
            format!("{:.0}", sum(|r| r.writes_per_sec)),
            human_bytes(node.ranges.iter().map(|r| r.approx_size_bytes).sum()),
            format!("{}s", node.uptime_seconds),
        ]);
    }
    println!("{node_table}");
    // One row per copy: each replica of a replicated range reports the load it served.
    let mut range_table = table(&[
        "range",
        "span",
        "gen",
        "on",
        "owner",
        "reads/s",
        "writes/s",
        "bytes/s",
        "size on disk",
        "keys",
        "hot keys",
    ]);
    for node in &nodes {
        for r in &node.ranges {
            let end = r.range.end_or_inf();
            let hot =
                r.hot_keys.iter().take(3).map(|(k, ops)| format!("{k} ({ops:.0}/s)")).collect::<Vec<_>>().join(", ");
            range_table.add_row(vec![
                r.range.range_id.to_string(),
                format!("[{}, {})", r.range.start, end),
                r.range.generation.to_string(),
                node.node_id.clone(),
                r.range.owner.clone(),
                format!("{:.0}", r.reads_per_sec),
                format!("{:.0}", r.writes_per_sec),
                human_bytes(r.bytes_per_sec as u64),
                human_bytes(r.approx_size_bytes),
                r.approx_keys.to_string(),
                hot,
            ]);
        }
    }
    println!("{range_table}");
    Ok(())
}

/// A client of the resharding loop's status API at `address`, connected now; or why not (the
/// gRPC code it stands for, what failed, the error).
async fn status_api(address: &str) -> Result<ControllerClient<Channel>, (tonic::Code, &'static str, String)> {
    let endpoint = kvfleet_client::channels::endpoint(address)
        .map_err(|e| (tonic::Code::InvalidArgument, "bad address", e.reason))?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| (tonic::Code::Unavailable, "cannot connect", e.to_string()))?;
    Ok(ControllerClient::new(channel))
}

async fn controller_status(address: &str, json: bool) -> Result<(), CliError> {
    let mut api = status_api(address)
        .await
        .map_err(|(_, what, error)| CliError::Failed(format!("controller at {address}: {what}: {error}")))?;
    let mut request = tonic::Request::new(ControllerStatusRequest {});
    request.set_timeout(Duration::from_secs(5));
    let status =
        api.status(request).await.map_err(|s| CliError::Rpc { address: address.to_string(), status: s })?.into_inner();
    if json {
        print_json(&kvfleet_view::to_json(&status))
    } else {
        print!("{}", kvfleet_view::render(&status));
        Ok(())
    }
}

async fn node_status(client: &Client, address: &str) -> NodeStatus {
    let mut status = NodeStatus {
        node_id: String::new(),
        address: address.to_string(),
        reachable: false,
        error: None,
        durability: String::new(),
        uptime_seconds: 0,
        ranges: Vec::new(),
    };
    let result: Result<(), String> = async {
        let mut admin = client.admin(address).map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(NodeInfoRequest {});
        request.set_timeout(Duration::from_secs(2));
        let info = admin.node_info(request).await.map_err(|s| s.message().to_string())?.into_inner();
        status.node_id = info.node_id.clone();
        status.durability = match info.durability() {
            Durability::Sync => "sync".into(),
            Durability::Async => format!("async ({} ms)", info.fsync_interval_ms),
            Durability::Unspecified => "?".into(),
        };
        status.uptime_seconds = info.uptime_seconds;
        let report = admin
            .load_report(LoadReportRequest { sample_keys: 1, hot_keys: 3 })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        status.ranges = report
            .ranges
            .iter()
            .map(|r| RangeStatus {
                range: r
                    .range
                    .as_ref()
                    .map(RangeView::from)
                    .unwrap_or_else(|| RangeView::from(&RangeDescriptor::default())),
                reads_per_sec: r.reads_per_sec,
                writes_per_sec: r.writes_per_sec,
                bytes_per_sec: r.read_bytes_per_sec + r.write_bytes_per_sec,
                approx_size_bytes: r.approx_size_bytes,
                approx_keys: r.approx_keys,
                hot_keys: r.hot_keys.iter().map(|h| (display_key(&h.key), h.ops_per_sec)).collect(),
            })
            .collect();
        Ok(())
    }
    .await;
    status.reachable = result.is_ok();
    status.error = result.err();
    status
}

fn print_bench(report: &BenchReport) {
    println!(
        "{} workload {:?} ({:?}), {} records x {} B, {} clients over {} connections, {} reads",
        report.target,
        report.workload,
        report.distribution,
        report.records,
        report.value_size,
        report.concurrency,
        report.connections,
        report.read_consistency
    );
    if let (Some(seconds), Some(rate)) = (report.load_seconds, report.load_ops_per_sec) {
        println!("load: {seconds:.1} s ({rate:.0} writes/s)");
    }
    let mut out = table(&["op", "count", "ops/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs"]);
    for (name, summary) in [("read", &report.reads), ("update", &report.updates), ("all", &report.all)] {
        if summary.count == 0 {
            continue;
        }
        out.add_row(vec![
            name.to_string(),
            summary.count.to_string(),
            format!("{:.0}", summary.count as f64 / report.run_seconds),
            summary.p50_us.to_string(),
            summary.p99_us.to_string(),
            summary.p999_us.to_string(),
            summary.max_us.to_string(),
        ]);
    }
    println!("{out}");
    println!(
        "run: {:.1} s, {:.0} ops/s, {} errors, {} verification failures",
        report.run_seconds, report.ops_per_sec, report.errors, report.verify_failures
    );
}
