//! The dashboard's script (`app.js`) under Node with a stub DOM: how it applies events to
//! its model (machine metadata, per-unit history) and reads its address. Skipped, saying so,
//! where `node` is not installed; the browser test (`functional/tests/dashboard.rs`) covers
//! the page as a whole.

use std::process::Command;

/// Loads app.js in a VM context whose DOM, `fetch` and `EventSource` do nothing, then runs
/// `checks` (JavaScript with `apply`, `machines`, `history`, `pageUnit` and `location` in
/// scope) and returns what it prints.
fn run(checks: &str) -> Option<String> {
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/src/dashboard/app.js");
    let script = format!(
        r#"
const vm = require("vm");
const fs = require("fs");
function stub() {{
  const store = {{ value: "", textContent: "", dataset: {{}}, style: {{}}, hidden: false }};
  return new Proxy(function () {{}}, {{
    get(_t, k) {{
      if (k === "tBodies") return [stub()];
      if (k in store) return store[k];
      if (typeof k === "symbol") return undefined;
      return () => stub();
    }},
    set(_t, k, v) {{ store[k] = v; return true; }},
    apply() {{ return stub(); }},
  }});
}}
const ctx = {{
  document: stub(), window: stub(), location: {{ hash: "" }},
  fetch: () => new Promise(() => {{}}), EventSource: function () {{ return stub(); }},
  setTimeout: () => 0, clearTimeout: () => {{}}, console,
}};
vm.createContext(ctx);
const src = fs.readFileSync({app:?}, "utf8");
vm.runInContext(src + "\n;globalThis.__t = {{ apply, machines, history, pageUnit }};", ctx);
const {{ apply, machines, history, pageUnit }} = ctx.__t;
const location = ctx.location;
{checks}
"#
    );
    match Command::new("node").arg("-e").arg(&script).output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "node failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Err(e) => {
            eprintln!("skipped: cannot run node: {e}");
            None
        }
    }
}

#[test]
fn machine_changed_replaces_the_configured_metadata() {
    let got = run(r#"
const m = "2c4b0d1bd4cd4a8d90d4c4e0e4b0f2a1";
apply({ type: "machine-joined", revision: 1, machine: m, primaryIP: "10.0.0.1", metadata: { az: "a", disk: "ssd" } });
apply({ type: "machine-metadata", revision: 2, machine: m, key: "owner", value: "ops" });
apply({ type: "machine-changed", revision: 3, machine: m, primaryIP: "10.0.0.2", metadata: { az: "b" } });
console.log(JSON.stringify(machines.get(m).metadata));
"#);
    if let Some(got) = got {
        assert_eq!(got, r#"{"az":"b","owner":"ops"}"#);
    }
}

#[test]
fn unit_history_is_capped_and_dropped_with_the_unit() {
    let got = run(r#"
for (let i = 1; i <= 1000; i++) {
  apply({ type: "unit-changed", revision: i, unit: "a.service", desiredState: "launched", previousDesiredState: "loaded", hash: "h", previousHash: "h" });
}
const h = history.get("a.service");
const kept = h.length + " " + h[0].revision + " " + h[h.length - 1].revision;
apply({ type: "unit-destroyed", revision: 1001, unit: "a.service" });
console.log(kept + " " + history.has("a.service"));
"#);
    if let Some(got) = got {
        assert_eq!(got, "200 801 1000 false");
    }
}

#[test]
fn a_malformed_address_shows_the_main_page() {
    let got = run(r##"
location.hash = "#unit/%E0%A4%A";
let a;
try { a = String(pageUnit()); } catch (e) { a = "threw " + e.name; }
location.hash = "#unit/web%40.service";
console.log(a + " " + pageUnit());
"##);
    if let Some(got) = got {
        assert_eq!(got, "null web@.service");
    }
}
