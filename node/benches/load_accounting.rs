//! The cost of per-range load accounting on the request path, per request, with accounting on
//! and off: `cargo bench -p kvfleet-node --bench load_accounting`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kvfleet_node::load::RangeLoad;

fn record(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..1024u32).map(|i| format!("user{:012}", i * 7919).into_bytes()).collect();
    for (name, enabled) in [("on", true), ("off", false)] {
        let load = RangeLoad::new(enabled, 10);
        let mut i = 0usize;
        c.bench_function(&format!("record_read/accounting_{name}"), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                load.record_read(black_box(&keys[i]), 116);
            })
        });
        c.bench_function(&format!("record_write/accounting_{name}"), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                load.record_write(black_box(&keys[i]), 116);
            })
        });
    }
}

criterion_group!(benches, record);
criterion_main!(benches);
