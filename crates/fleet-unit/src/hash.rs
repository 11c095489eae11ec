//! The unit hash: SHA-1 of a unit file's canonical serialization, as fleet computed it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha1::{Digest, Sha1};

/// SHA-1 of a unit's canonical bytes. Displays as 40 lowercase hex digits; fleetctl shows
/// the first 7 ([`UnitHash::short`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnitHash(pub [u8; 20]);

/// A string that is not 40 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid unit hash {input:?}: expected 40 hexadecimal digits")]
pub struct UnitHashError {
    pub input: String,
}

impl UnitHash {
    /// SHA-1 of `bytes`.
    pub fn of(bytes: &[u8]) -> UnitHash {
        UnitHash(Sha1::digest(bytes).into())
    }

    /// The first 7 hex digits, as fleetctl prints them without `--full`.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(7);
        s
    }

    /// The raw 20 bytes.
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// All zeroes: fleet's "no hash".
    pub fn is_empty(&self) -> bool {
        self.0 == [0u8; 20]
    }
}

impl fmt::Display for UnitHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for UnitHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnitHash({self})")
    }
}

impl FromStr for UnitHash {
    type Err = UnitHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || UnitHashError {
            input: s.to_string(),
        };
        if s.len() != 40 {
            return Err(err());
        }
        let mut out = [0u8; 20];
        hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
        Ok(UnitHash(out))
    }
}

impl Serialize for UnitHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for UnitHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let hex = "e55c0aeb44ba0b68004ceb8a200e685194448b45";
        let h: UnitHash = hex.parse().expect("valid hash");
        assert_eq!(h.to_string(), hex);
        assert_eq!(h.short(), "e55c0ae");
        let upper: UnitHash = hex.to_uppercase().parse().expect("uppercase accepted");
        assert_eq!(upper, h);
        assert_eq!(
            serde_json::to_string(&h).expect("serialize"),
            format!("\"{hex}\"")
        );
        let back: UnitHash = serde_json::from_str(&format!("\"{hex}\"")).expect("deserialize");
        assert_eq!(back, h);
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "e55c0ae",
            "zz5c0aeb44ba0b68004ceb8a200e685194448b45",
            "e55c0aeb44ba0b68004ceb8a200e685194448b4500",
        ] {
            let err = bad.parse::<UnitHash>().expect_err(bad);
            assert_eq!(
                err.to_string(),
                format!("invalid unit hash {bad:?}: expected 40 hexadecimal digits")
            );
        }
    }

    #[test]
    fn sha1_of_bytes() {
        assert_eq!(
            UnitHash::of(b"[Service]\nExecStart=/bin/sleep 100\n").to_string(),
            "1c6fb6f3684bafb0c173d8b8b957ceff031180c1"
        );
    }
}
