//! Several nodes' groups in one process, their messages delivered in memory: for tests and
//! benchmarks of the group driver, not a transport.

use std::collections::HashSet;

use crate::groups::{Envelope, GroupId, Groups, GroupsConfig, GroupsError, NodeId, Persist, new_group_storage};

pub struct LocalCluster {
    pub nodes: Vec<Groups>,
    /// Nodes that neither send nor receive (killed or cut off).
    pub down: HashSet<NodeId>,
    /// Messages delivered so far, and how many were Raft heartbeats or their answers.
    pub delivered: u64,
    pub heartbeats: u64,
    /// Stored entries the nodes were told to delete (tails overwritten by a new leader).
    pub stale_entries: u64,
    /// Read indexes granted: (node, group, context, index).
    pub reads: Vec<(NodeId, GroupId, Vec<u8>, u64)>,
}

impl LocalCluster {
    /// `nodes` nodes (ids 1..=nodes), each holding a replica of groups 1..=groups.
    pub fn new(nodes: u64, groups: u64, config: GroupsConfig) -> Result<Self, GroupsError> {
        let voters: Vec<NodeId> = (1..=nodes).collect();
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            down: HashSet::new(),
            delivered: 0,
            heartbeats: 0,
            stale_entries: 0,
            reads: Vec::new(),
        };
        for node in 1..=nodes {
            let mut groups_of_node = Groups::new(node, config.clone());
            for group in 1..=groups {
                groups_of_node.create(group, new_group_storage(&voters))?;
            }
            cluster.nodes.push(groups_of_node);
        }
        Ok(cluster)
    }

    pub fn node(&mut self, node: NodeId) -> &mut Groups {
        &mut self.nodes[(node - 1) as usize]
    }

    /// Every group campaigns on node `1 + group % nodes`, so leaders spread evenly.
    pub fn elect_spread(&mut self, groups: u64) -> Result<(), GroupsError> {
        let nodes = self.nodes.len() as u64;
        for group in 1..=groups {
            self.node(1 + group % nodes).campaign(group)?;
        }
        self.settle(1_000)
    }

    /// One tick on every live node.
    pub fn tick(&mut self) -> usize {
        let down = self.down.clone();
        self.nodes.iter_mut().filter(|n| !down.contains(&n.node())).map(Groups::tick).sum()
    }

    /// Ready -> deliver rounds until no message is in flight, at most `rounds` of them, with
    /// nothing written anywhere (the groups' in-memory logs are all there is).
    pub fn settle(&mut self, rounds: usize) -> Result<(), GroupsError> {
        self.settle_with(rounds, |_, _| Ok(())).map(|_| ())
    }

    /// `settle`, each node's batch written by `write(node, batch)`; returns how many committed
    /// entries the nodes were handed to apply.
    pub fn settle_with(
        &mut self,
        rounds: usize,
        mut write: impl FnMut(NodeId, &[Persist<'_>]) -> Result<(), String>,
    ) -> Result<u64, GroupsError> {
        let mut committed = 0;
        for _ in 0..rounds {
            let mut in_flight = Vec::new();
            let mut stale = 0;
            for node in self.nodes.iter_mut().filter(|n| !self.down.contains(&n.node())) {
                let id = node.node();
                let batch = node.ready(|persist| {
                    stale += persist.iter().map(|p| p.stale.end - p.stale.start).sum::<u64>();
                    write(id, persist)
                })?;
                committed += batch.committed.iter().map(|(_, entries)| entries.len() as u64).sum::<u64>();
                self.reads.extend(batch.reads.into_iter().map(|(group, context, index)| (id, group, context, index)));
                in_flight.extend(batch.messages);
            }
            self.stale_entries += stale;
            if in_flight.is_empty() {
                return Ok(committed);
            }
            for envelope in in_flight {
                if self.down.contains(&envelope.to()) {
                    continue;
                }
                self.delivered += 1;
                if let Envelope::Raft { message, .. } = &envelope
                    && crate::groups::is_heartbeat(message)
                {
                    self.heartbeats += 1;
                }
                let to = envelope.to();
                self.node(to).step(envelope)?;
            }
        }
        Ok(committed)
    }

    /// The leader every live replica of `group` agrees on, if they agree.
    pub fn agreed_leader(&self, group: GroupId) -> Option<NodeId> {
        let mut leaders = self.nodes.iter().filter(|n| !self.down.contains(&n.node())).map(|n| n.leader_of(group));
        let first = leaders.next()??;
        leaders.all(|l| l == Some(first)).then_some(first)
    }
}
