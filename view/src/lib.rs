//! Tables of the resharding loop's status (nodes, ranges, moves, hot keys, decisions not taken,
//! recent events), for people: printed by `kvctl status --controller` and by the playground's
//! live view, which both link this crate and nothing of the other's.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use kvfleet_proto::display_key;
use kvfleet_proto::v1::{ControllerStatus, RangeDescriptor};

/// Ranges shown before the table is cut (hottest first).
const MAX_RANGE_ROWS: usize = 24;

pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    table
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

fn span(start: &[u8], end: &[u8]) -> String {
    let end = if end.is_empty() { "+inf".to_string() } else { display_key(end) };
    format!("[{}, {end})", display_key(start))
}

fn describe(desc: Option<&RangeDescriptor>) -> (String, String, String) {
    desc.map_or_else(Default::default, |d| {
        (d.range_id.to_string(), span(&d.start_key, &d.end_key), d.generation.to_string())
    })
}

pub fn render(status: &ControllerStatus) -> String {
    let mut out = String::new();
    if !status.conflicts.is_empty() {
        let mut conflicts = table(&["older range", "span", "gen", "on", "overlaps newer", "span", "gen", "on"]);
        for c in &status.conflicts {
            let (older, older_span, older_gen) = describe(c.older.as_ref());
            let (newer, newer_span, newer_gen) = describe(c.newer.as_ref());
            conflicts.add_row(vec![
                older,
                older_span,
                older_gen,
                c.older_node.clone(),
                newer,
                newer_span,
                newer_gen,
                c.newer_node.clone(),
            ]);
        }
        out.push_str(&format!(
            "OWNERSHIP CONFLICTS: these keys are served by more than one node; nothing is planned on them\n\
             {conflicts}\n"
        ));
    }
    let mut nodes = table(&["node", "address", "state", "ranges", "ops/s", "size on disk", "restarts"]);
    for node in &status.nodes {
        nodes.add_row(vec![
            node.node_id.clone(),
            node.address.clone(),
            node.state.clone(),
            node.ranges.to_string(),
            format!("{:.0}", node.ops_per_sec),
            human_bytes(node.size_bytes),
            node.restarts.to_string(),
        ]);
    }
    // `+ 0.0` turns the -0.0 of an empty sum into 0.
    let total_ops: f64 = status.nodes.iter().map(|n| n.ops_per_sec).sum::<f64>() + 0.0;
    let busiest = status.nodes.iter().map(|n| n.ops_per_sec).fold(0.0, f64::max);
    let mean = total_ops / status.nodes.len().max(1) as f64;
    let replication = match status.replication_factor {
        0 | 1 => String::new(),
        n => format!(
            " · {n} replicas per range, {} under-replicated, {} without a leader",
            status.under_replicated.len(),
            status.leaderless.len()
        ),
    };
    out.push_str(&format!(
        "round {} · {} ranges · {:.0} ops/s · busiest node at {:.2}x the mean · {} moves in flight{replication}\n{nodes}\n",
        status.round,
        status.ranges.len(),
        total_ops,
        if mean > 0.0 { busiest / mean } else { 0.0 },
        status.moves.len()
    ));

    let mut ranges: Vec<_> = status.ranges.iter().collect();
    ranges.sort_by(|a, b| b.ops_per_sec.total_cmp(&a.ops_per_sec).then(a.start_key.cmp(&b.start_key)));
    let mut range_table = table(&[
        "range",
        "span",
        "gen",
        "owner (leader)",
        "replicas",
        "ops/s",
        "bytes/s",
        "size on disk",
        "hottest key",
    ]);
    for r in ranges.iter().take(MAX_RANGE_ROWS) {
        let hot = if r.hot_key.is_empty() {
            String::new()
        } else {
            format!("{} ({:.0}/s)", display_key(&r.hot_key), r.hot_key_ops_per_sec)
        };
        range_table.add_row(vec![
            r.range_id.to_string(),
            span(&r.start_key, &r.end_key),
            r.generation.to_string(),
            r.owner.clone(),
            r.replicas.join(", "),
            format!("{:.0}", r.ops_per_sec),
            human_bytes(r.bytes_per_sec as u64),
            human_bytes(r.size_bytes),
            hot,
        ]);
    }
    out.push_str(&format!("{range_table}\n"));
    if ranges.len() > MAX_RANGE_ROWS {
        out.push_str(&format!("(busiest {MAX_RANGE_ROWS} of {} ranges shown)\n", ranges.len()));
    }

    if !status.moves.is_empty() {
        let mut moves = table(&["move", "range", "from", "to", "phase", "running", "reason"]);
        for m in &status.moves {
            moves.add_row(vec![
                m.move_id.to_string(),
                m.range_id.to_string(),
                m.from.clone(),
                m.to.clone(),
                m.phase.clone(),
                format!("{:.1}s", m.running_ms as f64 / 1000.0),
                m.reason.clone(),
            ]);
        }
        out.push_str(&format!("moves in flight\n{moves}\n"));
    }
    if !status.hot_keys.is_empty() {
        let mut hot = table(&["hot key", "range", "ops/s"]);
        for h in &status.hot_keys {
            hot.add_row(vec![display_key(&h.key), h.range_id.to_string(), format!("{:.0}", h.ops_per_sec)]);
        }
        out.push_str(&format!("{hot}\n"));
    }
    if !status.skips.is_empty() {
        let mut skips = table(&["not done", "times", "last reason"]);
        for s in &status.skips {
            skips.add_row(vec![s.kind.clone(), s.count.to_string(), s.last.clone()]);
        }
        out.push_str(&format!("{skips}\n"));
    }
    if !status.recent_events.is_empty() {
        out.push_str("recent:\n");
        for event in status.recent_events.iter().rev().take(8).rev() {
            out.push_str(&format!("  {event}\n"));
        }
    }
    out
}

/// The same status as JSON, keys printed as in the tables.
pub fn to_json(status: &ControllerStatus) -> serde_json::Value {
    use serde_json::json;
    json!({
        "round": status.round,
        "lastRoundUnixMs": status.last_round_unix_ms,
        "degradedRounds": status.degraded_rounds,
        "replicationFactor": status.replication_factor,
        "underReplicated": status.under_replicated,
        "leaderless": status.leaderless,
        "nodes": status.nodes.iter().map(|n| json!({
            "nodeId": n.node_id, "address": n.address, "state": n.state, "ranges": n.ranges,
            "opsPerSec": n.ops_per_sec, "sizeBytes": n.size_bytes, "restarts": n.restarts,
        })).collect::<Vec<_>>(),
        "ranges": status.ranges.iter().map(|r| json!({
            "rangeId": r.range_id, "start": display_key(&r.start_key), "end": display_key(&r.end_key),
            "generation": r.generation, "owner": r.owner, "state": format!("{:?}", r.state()),
            "opsPerSec": r.ops_per_sec, "bytesPerSec": r.bytes_per_sec, "sizeBytes": r.size_bytes,
            "hotKey": display_key(&r.hot_key), "hotKeyOpsPerSec": r.hot_key_ops_per_sec,
            "replicas": r.replicas,
        })).collect::<Vec<_>>(),
        "moves": status.moves.iter().map(|m| json!({
            "moveId": m.move_id, "rangeId": m.range_id, "from": m.from, "to": m.to, "phase": m.phase,
            "runningMs": m.running_ms, "reason": m.reason,
        })).collect::<Vec<_>>(),
        "hotKeys": status.hot_keys.iter().map(|h| json!({
            "rangeId": h.range_id, "key": display_key(&h.key), "opsPerSec": h.ops_per_sec,
        })).collect::<Vec<_>>(),
        "skips": status.skips.iter().map(|s| json!({"kind": s.kind, "count": s.count, "last": s.last})).collect::<Vec<_>>(),
        "conflicts": status.conflicts.iter().map(|c| {
            let side = |d: Option<&RangeDescriptor>, node: &str| d.map(|d| json!({
                "rangeId": d.range_id, "start": display_key(&d.start_key), "end": display_key(&d.end_key),
                "generation": d.generation, "node": node,
            }));
            json!({"older": side(c.older.as_ref(), &c.older_node), "newer": side(c.newer.as_ref(), &c.newer_node)})
        }).collect::<Vec<_>>(),
        "recentEvents": status.recent_events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::v1::{MoveStatus, NodeStatus, OwnershipConflict, RangeStatus, SkipCount};

    #[test]
    fn renders_every_section_with_its_content() {
        let status = ControllerStatus {
            round: 7,
            nodes: vec![NodeStatus {
                node_id: "n1".into(),
                state: "up".into(),
                ops_per_sec: 300.0,
                ..Default::default()
            }],
            ranges: vec![RangeStatus {
                range_id: 12,
                start_key: "user1".into(),
                hot_key: "user42".into(),
                hot_key_ops_per_sec: 250.0,
                owner: "n1".into(),
                replicas: vec!["n1".into(), "n2".into(), "n3".into()],
                ..Default::default()
            }],
            replication_factor: 3,
            under_replicated: vec![12],
            moves: vec![MoveStatus {
                move_id: 3,
                range_id: 12,
                from: "n1".into(),
                to: "n2".into(),
                ..Default::default()
            }],
            skips: vec![SkipCount { kind: "cooldown".into(), count: 4, last: "range 12: moved recently".into() }],
            recent_events: vec!["split range 1".into()],
            conflicts: vec![OwnershipConflict {
                newer: Some(RangeDescriptor { range_id: 21, generation: 9, ..Default::default() }),
                newer_node: "n2".into(),
                older: Some(RangeDescriptor { range_id: 14, generation: 7, ..Default::default() }),
                older_node: "n3".into(),
            }],
            ..Default::default()
        };
        let text = render(&status);
        let conflict_row =
            |l: &&str| l.contains(" 14 ") && l.contains(" n3 ") && l.contains(" 21 ") && l.contains(" n2 ");
        assert!(text.lines().any(|l| conflict_row(&l)), "no conflict row in:\n{text}");
        for expected in [
            "OWNERSHIP CONFLICTS",
            "round 7",
            "[user1, +inf)",
            "user42 (250/s)",
            "moves in flight",
            "cooldown",
            "n1, n2, n3",
            "3 replicas per range, 1 under-replicated",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
    }
}
