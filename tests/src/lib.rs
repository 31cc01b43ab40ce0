//! Test harness: real squid, real origins, real cgroups, the real daemon.
