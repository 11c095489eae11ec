//! The list endpoints read one page of the registry per request: a page goes on from where
//! the page before ended, never from a whole listing, and the pages add up to exactly the
//! whole list, whatever their size.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use common::Harness;
use fleet_api::{ApiConfig, PageToken};
use fleet_registry::{
    MachineView, MemoryRegistry, PageStart, Registry, Result, StateRecord, UnitView,
};
use fleet_testutil::records;
use fleet_unit::{TargetState, UnitFile, UnitName};
use proptest::prelude::*;

/// A [`MemoryRegistry`] that counts whole listings and page reads.
#[derive(Default)]
struct Counting {
    inner: MemoryRegistry,
    whole: AtomicUsize,
    pages: AtomicUsize,
}

#[async_trait]
impl Registry for Counting {
    async fn create_unit(&self, n: &UnitName, f: &UnitFile, d: TargetState) -> Result<()> {
        self.inner.create_unit(n, f, d).await
    }
    async fn replace_unit(&self, n: &UnitName, f: &UnitFile, d: TargetState) -> Result<()> {
        self.inner.replace_unit(n, f, d).await
    }
    async fn set_desired_state(&self, n: &UnitName, d: TargetState) -> Result<()> {
        self.inner.set_desired_state(n, d).await
    }
    async fn destroy_unit(&self, n: &UnitName) -> Result<bool> {
        self.inner.destroy_unit(n).await
    }
    async fn unit(&self, n: &UnitName) -> Result<Option<UnitView>> {
        self.inner.unit(n).await
    }
    async fn units(&self) -> Result<Vec<UnitView>> {
        self.whole.fetch_add(1, Ordering::SeqCst);
        self.inner.units().await
    }
    async fn units_page(&self, start: &PageStart<String>, limit: usize) -> Result<Vec<UnitView>> {
        self.pages.fetch_add(1, Ordering::SeqCst);
        if matches!(start, PageStart::Skip(n) if *n > 0) {
            self.whole.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.units_page(start, limit).await
    }
    async fn machines(&self) -> Result<Vec<MachineView>> {
        self.inner.machines().await
    }
    async fn unit_states(&self) -> Result<Vec<StateRecord>> {
        self.whole.fetch_add(1, Ordering::SeqCst);
        self.inner.unit_states().await
    }
    async fn unit_states_page(
        &self,
        start: &PageStart<(String, String)>,
        limit: usize,
    ) -> Result<Vec<StateRecord>> {
        self.pages.fetch_add(1, Ordering::SeqCst);
        if matches!(start, PageStart::Skip(n) if *n > 0) {
            self.whole.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.unit_states_page(start, limit).await
    }
    async fn set_machine_metadata(&self, m: &str, k: &str, v: Option<&str>) -> Result<()> {
        self.inner.set_machine_metadata(m, k, v).await
    }
}

/// A registry of `units` units, each reported by one or two machines.
async fn registry(units: usize) -> Arc<Counting> {
    let reg = Arc::new(Counting::default());
    let file = records::file("[Service]\nExecStart=/bin/true\n");
    for i in 0..units {
        let name = format!("u{i:03}.service");
        reg.create_unit(&records::name(&name), &file, TargetState::Launched)
            .await
            .expect("create");
        for m in 0..(1 + i % 2) {
            reg.inner
                .set_state(records::state(&name, &format!("m{m}"), file.hash()));
        }
    }
    reg
}

/// Walks a list endpoint through its tokens: the `field` of every item, page by page.
async fn walk(h: &Harness, path: &str, key: &str, field: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut url = path.to_string();
    loop {
        let r = h.get(&url).await;
        assert_eq!(r.status, 200, "{url}: {r:?}");
        let v = r.json();
        let items: Vec<String> = v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| i[field].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default();
        pages.push(items);
        match v["nextPageToken"].as_str() {
            Some(t) => url = format!("{path}?nextPageToken={t}"),
            None => return pages,
        }
        assert!(pages.len() < 1000, "endless pages at {path}");
    }
}

async fn check(units: usize, limit: u16) {
    let reg = registry(units).await;
    let h = Harness::with_registry(
        reg.clone(),
        ApiConfig {
            token_limit: limit,
            ..ApiConfig::default()
        },
    )
    .await;
    let want_units: Vec<String> = reg
        .inner
        .units()
        .await
        .expect("units")
        .iter()
        .map(|u| u.name.to_string())
        .collect();
    let want_states: Vec<String> = reg
        .inner
        .unit_states()
        .await
        .expect("states")
        .iter()
        .map(|s| format!("{}/{}", s.name, s.machine_id))
        .collect();
    let pages = walk(&h, "/fleet/v1/units", "units", "name").await;
    let limit = usize::from(limit);
    // every page full but the last, which is short (or empty after a full one, as in fleet)
    let (last, full) = pages.split_last().expect("one page at least");
    assert!(full.iter().all(|p| p.len() == limit), "{pages:?}");
    assert!(last.len() < limit, "{pages:?}");
    assert_eq!(pages.concat(), want_units, "units in pages of {limit}");
    let states: Vec<String> = walk(&h, "/fleet/v1/state", "states", "name").await.concat();
    let machines: Vec<String> = walk(&h, "/fleet/v1/state", "states", "machineID")
        .await
        .concat();
    let states: Vec<String> = states
        .iter()
        .zip(&machines)
        .map(|(n, m)| format!("{n}/{m}"))
        .collect();
    assert_eq!(states, want_states, "states in pages of {limit}");
    assert_eq!(
        reg.whole.load(Ordering::SeqCst),
        0,
        "a page read a whole listing"
    );
    h.stop().await.expect("clean shutdown");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any number of units in pages of any size: exactly the whole list, in order, each
    /// page read by itself.
    #[test]
    fn pages_add_up_to_the_whole_list(units in 0usize..40, limit in 1u16..12) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(check(units, limit));
    }
}

/// An API with pages of 3 over a registry of 7 units.
async fn seven_units_in_pages_of_three() -> (Arc<Counting>, Harness) {
    let reg = registry(7).await;
    let h = Harness::with_registry(
        reg.clone(),
        ApiConfig {
            token_limit: 3,
            ..ApiConfig::default()
        },
    )
    .await;
    (reg, h)
}

/// A token this server did not hand out (another fleetd's, or from before a restart) still
/// gets its page, counted from the first unit.
#[tokio::test]
async fn a_token_from_elsewhere_is_counted_from_the_first_unit() {
    let (_, h) = seven_units_in_pages_of_three().await;
    let token = PageToken::new(3, 2).encode();
    let r = h
        .get(&format!("/fleet/v1/units?nextPageToken={token}"))
        .await;
    let names: Vec<String> = r.json()["units"]
        .as_array()
        .expect("units")
        .iter()
        .map(|u| u["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["u003.service", "u004.service", "u005.service"]);
    h.stop().await.expect("clean shutdown");
}

/// Regression: two clients listing at once got the same token for their page 2, and the
/// second one's page 1 replaced where the first one's page 2 starts: the first repeated a
/// unit (or skipped one). Each listing now carries its own number in its tokens.
#[tokio::test]
async fn two_listings_at_once_each_go_on_from_their_own_page() {
    let (reg, h) = seven_units_in_pages_of_three().await;
    let page = |v: serde_json::Value| -> (Vec<String>, String) {
        let names = v["units"]
            .as_array()
            .expect("units")
            .iter()
            .map(|u| u["name"].as_str().unwrap_or_default().to_string())
            .collect();
        (names, v["nextPageToken"].as_str().unwrap_or("").to_string())
    };
    let (a1, a_next) = page(h.get("/fleet/v1/units").await.json());
    assert_eq!(a1, ["u000.service", "u001.service", "u002.service"]);
    // a unit that sorts first, then another client's page 1
    let file = records::file("[Service]\nExecStart=/bin/true\n");
    reg.create_unit(&records::name("a.service"), &file, TargetState::Launched)
        .await
        .expect("create");
    let (b1, b_next) = page(h.get("/fleet/v1/units").await.json());
    assert_eq!(b1, ["a.service", "u000.service", "u001.service"]);
    let (a2, _) = page(
        h.get(&format!("/fleet/v1/units?nextPageToken={a_next}"))
            .await
            .json(),
    );
    assert_eq!(a2, ["u003.service", "u004.service", "u005.service"]);
    let (b2, _) = page(
        h.get(&format!("/fleet/v1/units?nextPageToken={b_next}"))
            .await
            .json(),
    );
    assert_eq!(b2, ["u002.service", "u003.service", "u004.service"]);
    h.stop().await.expect("clean shutdown");
}
