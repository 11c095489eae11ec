//! Page tokens of the list endpoints: opaque to clients, fleet's bytes and then ours.
//!
//! A token is the page size (`token_limit`) and the 1-based page number, two little-endian
//! `u16`s, in URL-safe base64 with padding, as fleet's. A token made under another
//! `token_limit` is refused, so a client never mixes page sizes. The unit and state lists add
//! a listing number, a little-endian `u64`, after those four bytes: it tells apart two
//! clients reading the same pages at once (see [`Cursors`]). fleet read the first four bytes
//! and ignored the rest, as this decoder does, so a token of either kind is good for both.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;
use fleet_registry::PageStart;

/// fleet's default page size.
pub const DEFAULT_TOKEN_LIMIT: u16 = 100;

/// Which page of how many items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageToken {
    pub limit: u16,
    pub page: u16,
    /// Which listing the page belongs to (ours, not fleet's; `None`: a token as fleet made
    /// them).
    pub listing: Option<u64>,
}

impl PageToken {
    /// Page `page` of `limit` items, in fleet's format.
    pub fn new(limit: u16, page: u16) -> PageToken {
        PageToken {
            limit,
            page,
            listing: None,
        }
    }

    /// The first page.
    pub fn first(limit: u16) -> PageToken {
        PageToken::new(limit, 1)
    }

    /// The same page of listing `listing`.
    pub fn of_listing(self, listing: u64) -> PageToken {
        PageToken {
            listing: Some(listing),
            ..self
        }
    }

    pub fn next(self) -> PageToken {
        PageToken {
            page: self.page.saturating_add(1),
            ..self
        }
    }

    pub fn encode(self) -> String {
        let mut raw = Vec::with_capacity(12);
        raw.extend_from_slice(&self.limit.to_le_bytes());
        raw.extend_from_slice(&self.page.to_le_bytes());
        if let Some(l) = self.listing {
            raw.extend_from_slice(&l.to_le_bytes());
        }
        URL_SAFE.encode(raw)
    }

    /// Decodes a token; the messages are the ones fleet's Go decoder gave.
    pub fn decode(text: &str) -> Result<PageToken, String> {
        let raw = URL_SAFE.decode(text).map_err(|e| {
            let at = match e {
                base64::DecodeError::InvalidByte(at, _)
                | base64::DecodeError::InvalidLastSymbol(at, _) => at,
                // a missing or short final quantum: Go names where that quantum starts
                base64::DecodeError::InvalidLength(_) | base64::DecodeError::InvalidPadding => {
                    text.len() / 4 * 4
                }
            };
            format!("illegal base64 data at input byte {at}")
        })?;
        match raw.len() {
            0 => Err("EOF".to_string()),
            1..=3 => Err("unexpected EOF".to_string()),
            _ => Ok(PageToken {
                limit: u16::from_le_bytes([raw[0], raw[1]]),
                page: u16::from_le_bytes([raw[2], raw[3]]),
                // (fleet ignored what follows its four bytes; so do we, but a listing)
                listing: raw
                    .get(4..12)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_le_bytes),
            }),
        }
    }

    /// Reads the `nextPageToken` query values of a list request: none means the first page.
    pub fn from_query(values: &[String], limit: u16) -> Result<PageToken, String> {
        match values {
            [] => Ok(PageToken::first(limit)),
            [one] => {
                let tok = PageToken::decode(one)?;
                if tok.limit != limit {
                    return Err(format!("token limit must be {limit}"));
                }
                if tok.page == 0 {
                    return Err("token page must be greater than zero".to_string());
                }
                Ok(tok)
            }
            _ => Err("too many values for page token".to_string()),
        }
    }

    /// The items of this page, and the token of the next page when this one is full.
    ///
    /// As in fleet, a full last page still gets a next token; that next page is empty.
    pub fn slice<T: Clone>(self, all: &[T]) -> (Vec<T>, Option<PageToken>) {
        let start = (usize::from(self.page) - 1).saturating_mul(usize::from(self.limit));
        let stop = usize::from(self.page).saturating_mul(usize::from(self.limit));
        if start >= all.len() {
            return (Vec::new(), None);
        }
        if stop > all.len() {
            (all[start..].to_vec(), None)
        } else {
            (all[start..stop].to_vec(), Some(self.next()))
        }
    }
}

/// How many next pages [`Cursors`] remembers where they start.
pub const CURSORS_KEPT: usize = 1024;

/// Where the pages this API handed out tokens for start: the key of the last item of the
/// page before. A token only says which page (fleet's format, which fleetctl v1.0 passes
/// back as it got it), so without this every page would be found by counting from the
/// first item, which costs a whole listing per page. Each listing gets a number of its own
/// in its tokens ([`Cursors::listing`]), so two clients reading page 2 at once each go on
/// from their own page 1 (with fleet's bare tokens the second one's start replaced the
/// first's, which then skipped or repeated items). A token this API did not hand out, or
/// has forgotten (the oldest go first), is counted from the first item as before.
#[derive(Debug)]
pub struct Cursors<K> {
    starts: Mutex<(HashMap<PageToken, K>, VecDeque<PageToken>)>,
    /// The next listing's number; it starts at a random one, so a token from before a
    /// restart does not name a listing of this process.
    listings: AtomicU64,
}

impl<K: Clone> Default for Cursors<K> {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Cursors {
            starts: Mutex::new((HashMap::new(), VecDeque::new())),
            listings: AtomicU64::new(seed),
        }
    }
}

impl<K: Clone> Cursors<K> {
    /// `token` as this API answers it: a first page starts a listing of its own (a later
    /// page's token carries its listing on).
    pub fn listing(&self, token: PageToken) -> PageToken {
        if token.page > 1 {
            return token;
        }
        token.of_listing(self.listings.fetch_add(1, Ordering::Relaxed))
    }

    /// Where the page of `token` starts.
    pub fn start(&self, token: PageToken) -> PageStart<K> {
        let known = self
            .starts
            .lock()
            .ok()
            .and_then(|s| s.0.get(&token).cloned());
        match known {
            Some(key) if token.page > 1 => PageStart::After(key),
            _ => PageStart::Skip(
                (usize::from(token.page).saturating_sub(1))
                    .saturating_mul(usize::from(token.limit)),
            ),
        }
    }

    /// Remembers that the page of `token` starts after `key`.
    pub fn remember(&self, token: PageToken, key: K) {
        let Ok(mut s) = self.starts.lock() else {
            return;
        };
        let (map, order) = &mut *s;
        if map.insert(token, key).is_none() {
            order.push_back(token);
        }
        while order.len() > CURSORS_KEPT {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// How many starts are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.starts.lock().map(|s| s.0.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_fleet() {
        // fleet: PageToken{Limit: 100, Page: 2} -> "ZAACAA=="
        assert_eq!(PageToken::new(100, 2).encode(), "ZAACAA==");
        assert_eq!(PageToken::decode("ZAACAA=="), Ok(PageToken::new(100, 2)));
    }

    #[test]
    fn query_values() {
        let t = |limit: u16, page: u16| PageToken::new(limit, page).encode();
        let cases: Vec<(Vec<String>, Result<PageToken, &str>)> = vec![
            (vec![], Ok(PageToken::new(2, 1))),
            (vec![t(2, 3)], Ok(PageToken::new(2, 3))),
            (vec![t(3, 1)], Err("token limit must be 2")),
            (vec![t(2, 0)], Err("token page must be greater than zero")),
            (
                vec![t(2, 1), t(2, 2)],
                Err("too many values for page token"),
            ),
            (vec!["".into()], Err("EOF")),
            (vec!["AAA=".into()], Err("unexpected EOF")),
            (
                vec!["!!!!".into()],
                Err("illegal base64 data at input byte 0"),
            ),
            (
                vec!["ZAACAA".into()],
                Err("illegal base64 data at input byte 4"),
            ),
        ];
        for (values, expected) in cases {
            let got = PageToken::from_query(&values, 2);
            assert_eq!(got, expected.map_err(String::from), "{values:?}");
        }
    }

    #[test]
    fn slices_pages() {
        let all = [1, 2, 3, 4, 5];
        let cases: &[(u16, &[i32], Option<u16>)] = &[
            (1, &[1, 2], Some(2)),
            (2, &[3, 4], Some(3)),
            (3, &[5], None),
            (4, &[], None),
        ];
        for (page, items, next) in cases {
            let (got, tok) = PageToken::new(2, *page).slice(&all);
            assert_eq!(got, *items, "page {page}");
            assert_eq!(tok.map(|t| t.page), *next, "page {page}");
        }
        // a full last page points at an empty one, as fleet did
        let (got, tok) = PageToken::new(5, 1).slice(&all);
        assert_eq!((got.len(), tok.map(|t| t.page)), (5, Some(2)));
    }

    #[test]
    fn cursors_remember_page_starts_and_forget_the_oldest() {
        let cursors: Cursors<String> = Cursors::default();
        let tok = |page: u16| PageToken::new(2, page);
        // unknown: counted from the first item
        assert_eq!(cursors.start(tok(3)), PageStart::Skip(4));
        assert_eq!(cursors.start(tok(1)), PageStart::Skip(0));
        cursors.remember(tok(2), "b".into());
        assert_eq!(cursors.start(tok(2)), PageStart::After("b".into()));
        // another page size is another token
        assert_eq!(cursors.start(PageToken::new(3, 2)), PageStart::Skip(3));
        for page in 3..(3 + CURSORS_KEPT as u16) {
            cursors.remember(tok(page), format!("k{page}"));
        }
        assert_eq!(cursors.len(), CURSORS_KEPT);
        assert_eq!(
            cursors.start(tok(2)),
            PageStart::Skip(2),
            "the oldest went first"
        );
        assert_eq!(cursors.start(tok(3)), PageStart::After("k3".into()));
    }
}
