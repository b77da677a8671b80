//! Network partitions between node processes on loopback, without root: a TCP proxy in front of
//! each node carries what other nodes send it, and drops what a cut forbids. Node `i` sends to
//! its peers from its own loopback address (`source_ip(i)`, the node's `--peer-source-ip`), so a
//! proxy knows which node a connection comes from; clients connect from 127.0.0.1 and are never
//! cut. A cut refuses new connections and closes the open ones, in both directions.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The loopback address node `index`'s connections to its peers come from.
pub fn source_ip(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + index as u8))
}

#[derive(Default)]
struct State {
    /// (from node, to node) pairs that may not talk.
    cuts: HashSet<(usize, usize)>,
    /// Open connections: from node, to node, the task copying them.
    open: Vec<(usize, usize, AbortHandle)>,
}

/// One proxy per node, and the cuts between them.
pub struct Partitions {
    state: Arc<Mutex<State>>,
    /// Where node `i`'s peers reach it (its proxy).
    pub addresses: Vec<String>,
    proxies: Vec<AbortHandle>,
}

impl Partitions {
    /// Proxies in front of `targets` (node `i` listens at `targets[i]`). Call from a Tokio
    /// runtime: the proxies run on it.
    pub fn new(targets: &[String]) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let mut addresses = Vec::new();
        let mut proxies = Vec::new();
        for (to, target) in targets.iter().enumerate() {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a proxy port");
            listener.set_nonblocking(true).expect("a non-blocking listener");
            addresses.push(listener.local_addr().expect("the proxy's address").to_string());
            let listener = TcpListener::from_std(listener).expect("a Tokio listener");
            let (state, target, count) = (state.clone(), target.clone(), targets.len());
            proxies.push(tokio::spawn(accept(listener, to, target, count, state)).abort_handle());
        }
        Partitions { state, addresses, proxies }
    }

    /// Cuts nodes `a` and `b` apart, both ways.
    pub fn cut(&self, a: usize, b: usize) {
        let mut state = self.state.lock().expect("partition state");
        state.cuts.insert((a, b));
        state.cuts.insert((b, a));
        state.open.retain(|(from, to, task)| {
            let cut = (*from, *to) == (a, b) || (*from, *to) == (b, a);
            if cut {
                task.abort();
            }
            !cut
        });
    }

    /// Cuts node `a` off from every other of `count` nodes.
    pub fn isolate(&self, a: usize, count: usize) {
        for b in (0..count).filter(|&b| b != a) {
            self.cut(a, b);
        }
    }

    pub fn heal(&self) {
        self.state.lock().expect("partition state").cuts.clear();
    }
}

impl Drop for Partitions {
    fn drop(&mut self) {
        for proxy in &self.proxies {
            proxy.abort();
        }
        for (_, _, task) in self.state.lock().map(|mut s| std::mem::take(&mut s.open)).unwrap_or_default() {
            task.abort();
        }
    }
}

async fn accept(listener: TcpListener, to: usize, target: String, count: usize, state: Arc<Mutex<State>>) {
    // Bounded: a test fleet lives minutes, not days.
    for _ in 0..1_000_000u32 {
        let Ok((inbound, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let from = node_of(peer, count);
        let mut guard = state.lock().expect("partition state");
        if from.is_some_and(|from| guard.cuts.contains(&(from, to))) {
            continue;
        }
        let target = target.clone();
        let task = tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(&target).await {
                let mut inbound = inbound;
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
        if let Some(from) = from {
            guard.open.retain(|(_, _, task)| !task.is_finished());
            guard.open.push((from, to, task.abort_handle()));
        }
    }
}

/// Which node a connection comes from (by its source address), if any.
fn node_of(peer: SocketAddr, count: usize) -> Option<usize> {
    (0..count).find(|&index| source_ip(index) == peer.ip())
}
