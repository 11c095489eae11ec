//! fleetctl's default driver: the fleet Registry over fleet's HTTP API v1.
