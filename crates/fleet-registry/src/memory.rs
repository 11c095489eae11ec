//! An in-memory [`Registry`] with the etcd driver's client-visible semantics, for tests and
//! fuzzing of what sits on top of a registry (the API). Never what fleetd runs.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use fleet_unit::{Requirements, TargetState, UnitFile, UnitName};

use crate::{
    MachineView, PageStart, Registry, RegistryError, Result, StateRecord, UnitView, current_state,
};

/// Units, machines, placements, reasons and states held in memory. Placements, reasons,
/// machines and states are what the engine and agents would write; tests set them directly.
#[derive(Default)]
pub struct MemoryRegistry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// name -> (name, body, desired state, global)
    units: BTreeMap<String, (UnitName, UnitFile, TargetState, bool)>,
    placements: BTreeMap<String, String>,
    reasons: BTreeMap<String, String>,
    /// Machines present, as their agents registered them (without API-set metadata).
    machines: BTreeMap<String, MachineView>,
    /// (machine, key) -> value set through the API; kept while the machine is away.
    metadata: BTreeMap<(String, String), String>,
    /// (unit, machine) -> state
    states: BTreeMap<(String, String), StateRecord>,
}

impl MemoryRegistry {
    pub fn new() -> MemoryRegistry {
        MemoryRegistry::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panicking test thread must not make every later call panic too
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A machine registers (or re-registers with new values).
    pub fn add_machine(&self, machine: MachineView) {
        self.lock().machines.insert(machine.id.clone(), machine);
    }

    /// A machine's presence expires.
    pub fn remove_machine(&self, id: &str) {
        self.lock().machines.remove(id);
    }

    /// The engine places `unit` on `machine` (`None`: unplaces it).
    pub fn set_placement(&self, unit: &str, machine: Option<&str>) {
        let mut inner = self.lock();
        match machine {
            Some(m) => inner.placements.insert(unit.to_string(), m.to_string()),
            None => inner.placements.remove(unit),
        };
    }

    /// The engine says why `unit` cannot be placed (`None`: clears it).
    pub fn set_reason(&self, unit: &str, reason: Option<&str>) {
        let mut inner = self.lock();
        match reason {
            Some(r) => inner.reasons.insert(unit.to_string(), r.to_string()),
            None => inner.reasons.remove(unit),
        };
    }

    /// An agent reports a unit's state.
    pub fn set_state(&self, state: StateRecord) {
        self.lock()
            .states
            .insert((state.name.clone(), state.machine_id.clone()), state);
    }

    fn view(inner: &Inner, key: &str) -> Option<UnitView> {
        let (name, file, desired, global) = inner.units.get(key)?;
        let machine = inner.placements.get(key).cloned();
        let state = machine
            .as_ref()
            .and_then(|m| inner.states.get(&(key.to_string(), m.clone())));
        Some(UnitView {
            current: current_state(machine.as_deref(), state, &file.hash()),
            name: name.clone(),
            hash: file.hash(),
            file: Arc::new(file.clone()),
            desired: *desired,
            global: *global,
            machine_id: machine,
            reason: inner.reasons.get(key).cloned(),
        })
    }
}

/// The page of units after the first `skip`.
fn start_cut(inner: &Inner, skip: usize, limit: usize) -> Vec<UnitView> {
    inner
        .units
        .keys()
        .filter_map(|k| MemoryRegistry::view(inner, k))
        .skip(skip)
        .take(limit)
        .collect()
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn create_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        // as the etcd driver: a unit whose requirements do not parse is not global
        let global = Requirements::is_global(name, file);
        let mut inner = self.lock();
        if inner.units.contains_key(name.as_str()) {
            return Err(RegistryError::AlreadyExists(name.to_string()));
        }
        inner.units.insert(
            name.to_string(),
            (name.clone(), file.clone(), desired, global),
        );
        Ok(())
    }

    async fn replace_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        let global = Requirements::is_global(name, file);
        // placement, reason and states stay: they are the engine's and the agents'
        self.lock().units.insert(
            name.to_string(),
            (name.clone(), file.clone(), desired, global),
        );
        Ok(())
    }

    async fn set_desired_state(&self, name: &UnitName, desired: TargetState) -> Result<()> {
        match self.lock().units.get_mut(name.as_str()) {
            Some(u) => {
                u.2 = desired;
                Ok(())
            }
            None => Err(RegistryError::NotFound(name.to_string())),
        }
    }

    async fn destroy_unit(&self, name: &UnitName) -> Result<bool> {
        Ok(self.lock().units.remove(name.as_str()).is_some())
    }

    async fn unit(&self, name: &UnitName) -> Result<Option<UnitView>> {
        Ok(MemoryRegistry::view(&self.lock(), name.as_str()))
    }

    async fn units(&self) -> Result<Vec<UnitView>> {
        let inner = self.lock();
        Ok(inner
            .units
            .keys()
            .filter_map(|k| MemoryRegistry::view(&inner, k))
            .collect())
    }

    async fn units_page(&self, start: &PageStart<String>, limit: usize) -> Result<Vec<UnitView>> {
        let inner = self.lock();
        let from = match start {
            PageStart::Skip(n) => return Ok(start_cut(&inner, *n, limit)),
            PageStart::After(k) => (Bound::Excluded(k.clone()), Bound::Unbounded),
        };
        Ok(inner
            .units
            .range::<String, _>(from)
            .filter_map(|(k, _)| MemoryRegistry::view(&inner, k))
            .take(limit)
            .collect())
    }

    async fn unit_states_page(
        &self,
        start: &PageStart<(String, String)>,
        limit: usize,
    ) -> Result<Vec<StateRecord>> {
        let inner = self.lock();
        let from = match start {
            PageStart::Skip(n) => {
                return Ok(inner
                    .states
                    .values()
                    .skip(*n)
                    .take(limit)
                    .cloned()
                    .collect());
            }
            PageStart::After(k) => (Bound::Excluded(k.clone()), Bound::Unbounded),
        };
        Ok(inner
            .states
            .range::<(String, String), _>(from)
            .map(|(_, s)| s.clone())
            .take(limit)
            .collect())
    }

    async fn machines(&self) -> Result<Vec<MachineView>> {
        let inner = self.lock();
        Ok(inner
            .machines
            .values()
            .map(|m| {
                let mut m = m.clone();
                for ((id, key), value) in &inner.metadata {
                    if *id == m.id {
                        m.metadata.insert(key.clone(), value.clone());
                    }
                }
                m
            })
            .collect())
    }

    async fn unit_states(&self) -> Result<Vec<StateRecord>> {
        // keyed by (unit, machine): already in the order the trait promises
        Ok(self.lock().states.values().cloned().collect())
    }

    async fn set_machine_metadata(
        &self,
        machine: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        let mut inner = self.lock();
        let k = (machine.to_string(), key.to_string());
        match value {
            Some(v) => inner.metadata.insert(k, v.to_string()),
            None => inner.metadata.remove(&k),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> UnitFile {
        UnitFile::parse(text).expect("unit parses")
    }

    #[tokio::test]
    async fn behaves_like_the_etcd_driver_for_clients() {
        let r = MemoryRegistry::new();
        let a: UnitName = "a.service".parse().expect("name");
        let g: UnitName = "g.service".parse().expect("name");
        let body = file("[Service]\nExecStart=/bin/true\n");
        r.create_unit(&a, &body, TargetState::Loaded)
            .await
            .expect("create");
        assert!(matches!(
            r.create_unit(&a, &body, TargetState::Loaded).await,
            Err(RegistryError::AlreadyExists(_))
        ));
        r.create_unit(&g, &file("[X-Fleet]\nGlobal=true\n"), TargetState::Launched)
            .await
            .expect("create global");
        r.set_desired_state(&a, TargetState::Launched)
            .await
            .expect("set");
        let missing: UnitName = "m.service".parse().expect("name");
        assert!(matches!(
            r.set_desired_state(&missing, TargetState::Loaded).await,
            Err(RegistryError::NotFound(_))
        ));

        r.add_machine(MachineView {
            id: "m1".into(),
            public_ip: "10.0.0.1".into(),
            metadata: BTreeMap::from([("region".into(), "east".into())]),
            version: "1.0.0".into(),
        });
        r.set_machine_metadata("m1", "disk", Some("ssd"))
            .await
            .expect("metadata");
        r.set_placement("a.service", Some("m1"));
        r.set_state(StateRecord {
            version: 1,
            name: "a.service".into(),
            machine_id: "m1".into(),
            hash: body.hash().to_string(),
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "running".into(),
            agent_state: TargetState::Launched,
            reason: None,
        });

        let units = r.units().await.expect("units");
        assert_eq!(
            units
                .iter()
                .map(|u| (u.name.as_str(), u.desired, u.global, u.current))
                .collect::<Vec<_>>(),
            [
                (
                    "a.service",
                    TargetState::Launched,
                    false,
                    TargetState::Launched
                ),
                (
                    "g.service",
                    TargetState::Launched,
                    true,
                    TargetState::Inactive
                ),
            ]
        );
        let m = r.machines().await.expect("machines");
        assert_eq!(m[0].metadata.get("disk").map(String::as_str), Some("ssd"));
        assert_eq!(r.unit_states().await.expect("states").len(), 1);
        assert!(r.destroy_unit(&a).await.expect("destroy"));
        assert!(!r.destroy_unit(&a).await.expect("destroy again"));
        assert!(r.unit(&a).await.expect("get").is_none());
    }
}
