//! A fleet whose range 1 is replicated on every node (`--initial-replicas`), on loopback: for
//! the replication tests and the failover benchmark.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_client::{Client, ClientConfig};
use kvfleet_proto::v1::{ListRangesRequest, PutRequest, RangeDescriptor, ReplicaRole};

use crate::NodeProcess;
use crate::control_plane::free_port;
use crate::partition::{Partitions, source_ip};

/// How long `leader` waits for one.
const PATIENCE: Duration = Duration::from_secs(30);

pub struct ReplicatedFleet {
    _dir: tempfile::TempDir,
    pub nodes: Vec<NodeProcess>,
    /// The proxies between the nodes, if the fleet was started partitionable.
    pub partitions: Option<Partitions>,
}

impl ReplicatedFleet {
    /// `count` nodes on loopback, range 1 replicated on all of them.
    pub fn start(count: usize) -> Self {
        Self::start_with(count, &[])
    }

    /// `start`, with `extra_args` for every node.
    pub fn start_with(count: usize, extra_args: &[&str]) -> Self {
        Self::launch(count, extra_args, false)
    }

    /// `count` nodes on loopback holding nothing: a new fleet for a controller to bootstrap.
    pub fn start_empty(count: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut fleet = ReplicatedFleet { _dir: dir, nodes: Vec::new(), partitions: None };
        for _ in 0..count {
            fleet.add_node();
        }
        fleet
    }

    /// `start`, with a proxy between the nodes that can cut them apart (`partitions`): each
    /// node reaches the others through their proxies, from its own loopback address. Call from
    /// a Tokio runtime.
    pub fn start_partitionable(count: usize) -> Self {
        Self::launch(count, &[], true)
    }

    /// Like `start_partitionable`, every node started with `extra_args`.
    pub fn start_partitionable_with(count: usize, extra_args: &[&str]) -> Self {
        Self::launch(count, extra_args, true)
    }

    fn launch(count: usize, extra_args: &[&str], partitionable: bool) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ids: Vec<String> = (1..=count).map(|n| format!("replica-{n}")).collect();
        let listen: Vec<String> = (0..count).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let partitions = partitionable.then(|| Partitions::new(&listen));
        let peers_reach = partitions.as_ref().map_or(&listen, |p| &p.addresses);
        let initial =
            ids.iter().zip(peers_reach).map(|(id, address)| format!("{id}={address}")).collect::<Vec<_>>().join(",");
        let nodes = ids
            .iter()
            .zip(&listen)
            .enumerate()
            .map(|(index, (id, address))| {
                let source = source_ip(index).to_string();
                let mut args: Vec<&str> = vec!["--initial-replicas", initial.as_str()];
                if partitionable {
                    args.extend(["--peer-source-ip", source.as_str()]);
                }
                args.extend(extra_args.iter().copied());
                NodeProcess::start_at(id, &dir.path().join(id), address, &args)
            })
            .collect();
        ReplicatedFleet { _dir: dir, nodes, partitions }
    }

    /// Restarts node `index` armed to abort (as kill -9 would) the first time it reaches crash
    /// point `crash_at`, writing `mark` just before; past that one crash it runs on.
    pub fn arm_crash_once(&mut self, index: usize, crash_at: &str, mark: &std::path::Path) {
        let env = vec![
            ("KVFLEET_CRASH_AT".into(), crash_at.into()),
            ("KVFLEET_CRASH_ONCE".into(), mark.display().to_string()),
        ];
        self.restart_with(index, env);
    }

    /// Restarts node `index` to hold the thread that first reaches `point` for `millis` ms,
    /// writing `mark` as it does.
    pub fn arm_pause_once(&mut self, index: usize, point: &str, millis: u64, mark: &std::path::Path) {
        let env = vec![
            ("KVFLEET_PAUSE_AT".into(), format!("{point}={millis}")),
            ("KVFLEET_PAUSE_MARK".into(), mark.display().to_string()),
        ];
        self.restart_with(index, env);
    }

    /// Kills node `index` (SIGKILL) and starts it again with `env`.
    pub fn restart_with(&mut self, index: usize, env: Vec<(String, String)>) {
        let node = &mut self.nodes[index];
        node.kill9();
        node.env = env;
        node.spawn();
    }

    /// Starts again every node that is down (one that aborted at its crash point).
    pub fn restart_stopped(&mut self) {
        for node in &mut self.nodes {
            if !node.is_running() {
                node.kill9();
                node.spawn();
            }
        }
    }

    /// Starts one more node, holding no replica (a move's target); returns its index.
    pub fn add_node(&mut self) -> usize {
        let index = self.nodes.len();
        let id = format!("replica-{}", index + 1);
        let address = format!("127.0.0.1:{}", free_port());
        self.nodes.push(NodeProcess::start_at(&id, &self._dir.path().join(&id), &address, &[]));
        index
    }

    /// Node `index` as a replica move names it.
    pub fn endpoint(&self, index: usize) -> kvfleet_resharding::replica_moves::Endpoint {
        let node = &self.nodes[index];
        kvfleet_resharding::replica_moves::Endpoint { node_id: node.node_id.clone(), address: node.address.clone() }
    }

    /// Every node's address.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.address.clone()).collect()
    }

    /// A client seeded with every node, with short attempts: a paused node holds an attempt
    /// until it times out, and the client should move on to the new leader quickly.
    pub fn client(&self) -> Client {
        let mut config = ClientConfig::new(self.nodes.iter().map(|n| n.address.clone()));
        config.deadline = Duration::from_secs(20);
        config.attempt_timeout = Duration::from_secs(1);
        Client::new(config).expect("client config")
    }

    /// The index of the node that says it leads range 1 (any but `not`), waiting for one.
    pub async fn leader(&mut self, not: Option<usize>) -> usize {
        self.leader_of(1, not).await
    }

    /// The index of the node that says it leads range `range_id` (any but `not`), waiting for one.
    pub async fn leader_of(&mut self, range_id: u64, not: Option<usize>) -> usize {
        let started = Instant::now();
        while started.elapsed() < PATIENCE {
            for (index, node) in self.nodes.iter_mut().enumerate() {
                if Some(index) == not || !node.is_running() {
                    continue;
                }
                let Ok(Ok(answer)) =
                    tokio::time::timeout(Duration::from_secs(1), node.admin().list_ranges(ListRangesRequest {})).await
                else {
                    continue;
                };
                let answer = answer.into_inner();
                let leads = answer
                    .ranges
                    .iter()
                    .filter(|d| d.range_id == range_id && d.is_raft_group())
                    .flat_map(|d| d.replicas.iter())
                    .any(|r| r.node_id == answer.node_id && r.role() == ReplicaRole::Leader);
                if leads {
                    return index;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no node leads range {range_id} after {PATIENCE:?}");
    }

    /// The ranges node `index` owns, if it answers.
    pub async fn ranges_on(&self, index: usize) -> Option<Vec<RangeDescriptor>> {
        let mut admin = self.nodes[index].admin();
        match tokio::time::timeout(Duration::from_secs(2), admin.list_ranges(ListRangesRequest {})).await {
            Ok(Ok(answer)) => Some(answer.into_inner().ranges),
            _ => None,
        }
    }

    /// Waits (bounded) until node `index` owns exactly the ranges `expected` (id, start, end).
    pub async fn wait_for_ranges(&self, index: usize, expected: &[(u64, &[u8], &[u8])]) {
        let started = Instant::now();
        let text = |key: &[u8]| String::from_utf8_lossy(key).into_owned();
        let mut want: Vec<_> = expected.iter().map(|(id, s, e)| (*id, text(s), text(e))).collect();
        want.sort();
        let mut seen = Vec::new();
        while started.elapsed() < PATIENCE {
            if let Some(ranges) = self.ranges_on(index).await {
                seen = ranges.iter().map(|d| (d.range_id, text(&d.start_key), text(&d.end_key))).collect();
                seen.sort();
                if seen == want {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("node {index} owns {seen:?} after {:?}, expected {want:?}", started.elapsed());
    }

    /// Whether node `index` acknowledges a write of "minority" to `key` within 4 s.
    pub async fn acknowledges_a_write(&self, index: usize, key: &'static str) -> bool {
        let request = PutRequest { header: None, key: Bytes::from(key), value: Bytes::from("minority") };
        matches!(tokio::time::timeout(Duration::from_secs(4), self.nodes[index].kv().put(request)).await, Ok(Ok(_)))
    }
}
