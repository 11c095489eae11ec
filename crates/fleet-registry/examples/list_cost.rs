//! Measures what listing the registry costs against a real etcd at a given size: fills the
//! registry with unit, placement and state records directly, then times a raw page read at
//! the start and at the end of `units/`, a whole paged listing (`Registry::units`), and the
//! API's way of listing (page after page from where the last one ended).
//!
//! `cargo run --release -p fleet-registry --example list_cost -- 20000 50000 100000`

use std::time::Instant;

use etcd_client::{GetOptions, Txn, TxnOp};
use fleet_registry::{PageStart, Registry};
use fleet_testutil::{EtcdServer, fixture, records};
use fleet_unit::TargetState;

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let etcd = EtcdServer::start();
    let r = fixture::connect(&etcd, fixture::PREFIX, std::time::Duration::from_secs(30)).await;
    let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("client");
    let body = records::body(1);
    let hash = body.hash();
    let p = fixture::PREFIX;
    c.put(format!("{p}bodies/{hash}"), body.serialize(), None)
        .await
        .expect("body");
    let mut filled = 0;
    for size in sizes {
        let t = Instant::now();
        while filled < size {
            let mut ops = Vec::new();
            for i in filled..(filled + 40).min(size) {
                let n = format!("u{i:07}.service");
                let unit = serde_json::to_string(&records::unit(&n, hash, TargetState::Launched))
                    .expect("json");
                let state = serde_json::to_string(&records::state(&n, "m1", hash)).expect("json");
                ops.push(TxnOp::put(format!("{p}units/{n}"), unit, None));
                ops.push(TxnOp::put(format!("{p}placement/{n}"), "m1", None));
                ops.push(TxnOp::put(format!("{p}states/{n}/m1"), state, None));
            }
            filled = (filled + 40).min(size);
            c.txn(Txn::new().and_then(ops)).await.expect("fill");
        }
        let fill_s = t.elapsed().as_secs_f64();
        let end = format!("{p}units0");
        let raw = |from: String| {
            let mut c = c.clone();
            let end = end.clone();
            async move {
                let t = Instant::now();
                for _ in 0..10 {
                    c.get(
                        from.clone(),
                        Some(GetOptions::new().with_range(end.clone()).with_limit(100)),
                    )
                    .await
                    .expect("get");
                }
                t.elapsed().as_secs_f64() * 100.0
            }
        };
        let first_ms = raw(format!("{p}units/")).await;
        let last_ms = raw(format!("{p}units/u{:07}.service", size - 100)).await;
        let t = Instant::now();
        let all = r.units().await.expect("units");
        let whole_s = t.elapsed().as_secs_f64();
        assert_eq!(all.len(), size);
        let t = Instant::now();
        let mut start = PageStart::Skip(0);
        let mut n = 0;
        loop {
            let page = r.units_page(&start, 100).await.expect("page");
            n += page.len();
            match page.last() {
                Some(u) if page.len() == 100 => start = PageStart::After(u.name.to_string()),
                _ => break,
            }
        }
        let pages_s = t.elapsed().as_secs_f64();
        assert_eq!(n, size);
        let t = Instant::now();
        let mut start = PageStart::Skip(0);
        let mut n = 0;
        loop {
            let page = r.unit_states_page(&start, 100).await.expect("page");
            n += page.len();
            match page.last() {
                Some(s) if page.len() == 100 => {
                    start = PageStart::After((s.name.clone(), s.machine_id.clone()))
                }
                _ => break,
            }
        }
        let state_pages_s = t.elapsed().as_secs_f64();
        assert_eq!(n, size);
        println!(
            "units={size} fill_s={fill_s:.1} page100_at_start_ms={first_ms:.2} page100_at_end_ms={last_ms:.2} whole_list_paged_s={whole_s:.3} api_unit_pages_s={pages_s:.2} api_state_pages_s={state_pages_s:.2}"
        );
    }
}
