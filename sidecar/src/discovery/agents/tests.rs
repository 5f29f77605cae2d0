//! Which requests are the listing, and the card cache.

use super::*;

#[test]
fn get_agents_with_or_without_a_slash_is_the_listing_and_nothing_else_is() {
    let listing = |m: http::Method, u: &str| is_listing(&m, &u.parse().unwrap());
    assert!(listing(http::Method::GET, "/agents"));
    assert!(listing(http::Method::GET, "/agents/"));
    assert!(listing(http::Method::GET, "/agents?team=content"));
    assert!(!listing(http::Method::POST, "/agents"));
    assert!(!listing(http::Method::GET, "/agents/research"));
    assert!(!listing(
        http::Method::GET,
        "/agents/research/.well-known/agent-card.json"
    ));
    assert!(!listing(http::Method::GET, "http://research/agents"));
}

#[test]
fn a_cached_card_lasts_its_ttl_within_one_bundle_version() {
    let cache = CardCache::default();
    assert_eq!(cache.get("writer", 3), None);
    cache.put("writer", 3, Bytes::from_static(b"{}"));
    assert_eq!(cache.get("writer", 3), Some(Bytes::from_static(b"{}")));
    // Another bundle: fetched again, and the old version's cards are gone.
    assert_eq!(cache.get("writer", 4), None);
    cache.put("critic", 4, Bytes::from_static(b"{\"a\":1}"));
    assert_eq!(cache.get("writer", 3), None);
    assert!(cache.get("critic", 4).is_some());
    // Past its TTL.
    cache
        .inner
        .lock()
        .unwrap()
        .cards
        .get_mut("critic")
        .unwrap()
        .0 -= CARD_TTL;
    assert_eq!(cache.get("critic", 4), None);
}

#[test]
fn a_peer_whose_sidecar_cannot_reach_its_app_is_an_outage_and_a_refusal_is_not() {
    assert!(is_outage("upstream"));
    assert!(is_outage("timeout"));
    assert!(is_outage("not_ready"));
    assert!(!is_outage("policy"));
    assert!(!is_outage("cycle"));
    assert!(!is_outage("budget"));
}
