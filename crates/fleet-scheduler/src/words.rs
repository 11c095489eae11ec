//! How the scheduler explains itself: phrases for unplaceable units and for moves.

use std::collections::BTreeMap;

/// `region=a`, `region=a or region=b`, `(region=a or region=b) and disk=ssd`.
pub(crate) fn metadata_phrase(md: &BTreeMap<String, Vec<String>>) -> String {
    let groups: Vec<String> = md
        .iter()
        .map(|(k, vs)| {
            let alts: Vec<String> = vs.iter().map(|v| format!("{k}={v}")).collect();
            let alts = alts.join(" or ");
            if vs.len() > 1 && md.len() > 1 {
                format!("({alts})")
            } else {
                alts
            }
        })
        .collect();
    groups.join(" and ")
}

/// `a`, `a and b`, `a, b and c`, `a, b, c and 4 more`.
pub(crate) fn name_list(names: &[&str]) -> String {
    const SHOWN: usize = 3;
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        _ if names.len() <= SHOWN => {
            let (last, rest) = names.split_last().unwrap_or((&"", &[]));
            format!("{} and {last}", rest.join(", "))
        }
        _ => format!(
            "{} and {} more",
            names[..SHOWN].join(", "),
            names.len() - SHOWN
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases() {
        let md = |pairs: &[(&str, &[&str])]| -> BTreeMap<String, Vec<String>> {
            pairs
                .iter()
                .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
                .collect()
        };
        let cases: Vec<(BTreeMap<String, Vec<String>>, &str)> = vec![
            (md(&[("region", &["us-east-1"])]), "region=us-east-1"),
            (md(&[("region", &["a", "b"])]), "region=a or region=b"),
            (
                md(&[("region", &["a", "b"]), ("disk", &["ssd"])]),
                "disk=ssd and (region=a or region=b)",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(metadata_phrase(&input), want);
        }
        let lists: &[(&[&str], &str)] = &[
            (&["a"], "a"),
            (&["a", "b"], "a and b"),
            (&["a", "b", "c"], "a, b and c"),
            (&["a", "b", "c", "d", "e"], "a, b, c and 2 more"),
        ];
        for (input, want) in lists {
            assert_eq!(name_list(input), *want);
        }
    }
}
