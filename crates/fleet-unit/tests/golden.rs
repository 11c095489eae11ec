//! Golden hashes: our example units (byte-identical to fleet's hello/ping/pong examples) and
//! tricky files whose canonical form was worked out by hand from fleet's serializer.

use fleet_unit::{UnitFile, UnitHash};

fn hash_of(text: &str) -> UnitHash {
    match UnitFile::parse(text) {
        Ok(unit) => unit.hash(),
        Err(e) => panic!("{text:?} does not parse: {e}"),
    }
}

fn example(name: &str) -> String {
    let path = format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"));
    match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => panic!("reading {path}: {e}"),
    }
}

#[test]
fn examples_hash_like_fleet() {
    // (file, canonical size, hash): hello/ping/pong are fleet's check values; global and
    // hello@ were cross-checked with an independent port of fleet's serializer.
    let cases = [
        (
            "hello.service",
            119,
            "e55c0aeb44ba0b68004ceb8a200e685194448b45",
        ),
        (
            "ping.service",
            104,
            "d9de011694dda111458a4fc9912ad629d86ad8af",
        ),
        (
            "pong.service",
            138,
            "667e8dead419d2cce5a664c0ba586ca33217f286",
        ),
        (
            "global.service",
            208,
            "03ef6a9f2bc7e352a76b31ed47510155ddfdbbc9",
        ),
        (
            "hello@.service",
            168,
            "e9be4e9aa21e5b00d8e86b85b2484802e37324f5",
        ),
    ];
    for (file, size, hash) in cases {
        let text = example(file);
        let unit = UnitFile::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(unit.serialize().len(), size, "{file}: canonical size");
        assert_eq!(unit.hash().to_string(), hash, "{file}: hash");
    }
    // hello.service is already canonical: its bytes are its serialization.
    let hello = example("hello.service");
    assert_eq!(hash_of(&hello).short(), "e55c0ae");
    assert_eq!(
        UnitFile::parse(&hello).map(|u| u.serialize()).ok(),
        Some(hello)
    );
}

#[test]
fn tricky_files_hash_as_fleet_would() {
    // (input, canonical text). The hash must be the SHA-1 of the canonical text, and inputs
    // that differ only in fleet-irrelevant ways must hash alike.
    let cases: &[(&str, &str)] = &[
        (
            "[Service]\nExecStart=/bin/sleep 100\n",
            "[Service]\nExecStart=/bin/sleep 100\n",
        ),
        // comments, blank lines, spaces around '=', CRLF, no final newline
        (
            "# hello\r\n\r\n[Service]\r\n  ExecStart = /bin/sleep 100  \r\n; bye",
            "[Service]\nExecStart=/bin/sleep 100\n",
        ),
        // repeated sections are merged under the first header, order kept
        (
            "[Unit]\nDescription=a\n[Service]\nExecStart=/bin/true\n[Unit]\nAfter=b.service\n",
            "[Unit]\nDescription=a\nAfter=b.service\n\n[Service]\nExecStart=/bin/true\n",
        ),
        // continuation lines keep backslashes, newlines and indentation
        (
            "[Service]\nExecStart=/bin/bash -c \\\n    \"echo hi\"\n",
            "[Service]\nExecStart=/bin/bash -c \\\n    \"echo hi\"\n",
        ),
        // a comment inside a continuation is part of the value
        (
            "[Service]\nExecStart=/bin/echo \\\n# not a comment\n",
            "[Service]\nExecStart=/bin/echo \\\n# not a comment\n",
        ),
        // a section with no options disappears
        (
            "[Unit]\n[Service]\nExecStart=/bin/true\n[Install]\n",
            "[Service]\nExecStart=/bin/true\n",
        ),
    ];
    for (input, canonical) in cases {
        let unit = UnitFile::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(unit.serialize(), *canonical, "{input:?}");
        assert_eq!(unit.hash(), UnitHash::of(canonical.as_bytes()), "{input:?}");
    }
    assert_eq!(
        hash_of("[Service]\nExecStart=/bin/sleep 100\n").to_string(),
        "1c6fb6f3684bafb0c173d8b8b957ceff031180c1"
    );
}

#[test]
fn instances_take_their_template_body() {
    use fleet_unit::{Requirements, UnitName};
    // fleetctl gives an instance without its own file the template's body, so the instance
    // has the template's hash; specifiers expand per instance in [X-Fleet].
    let body = UnitFile::parse(&example("hello@.service")).expect("template parses");
    let template = UnitName::parse("hello@.service").expect("valid");
    let cases = [
        ("hello@1.service", "hello@*.service"),
        ("hello@blue.service", "hello@*.service"),
    ];
    for (instance, conflict) in cases {
        let name = UnitName::parse(instance).expect("valid");
        assert_eq!(name.template().as_ref(), Some(&template));
        let (req, warnings) = Requirements::from_unit(&name, &body).expect("valid requirements");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(req.conflicts, vec![conflict.to_string()], "{instance}");
        assert!(req.conflicts_with("hello@2.service"));
    }
    let instance_body = UnitFile::from_options(body.options().to_vec());
    assert_eq!(instance_body.hash(), body.hash());
}
