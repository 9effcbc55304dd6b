"""testbed — the tooling that benchmarks (bench/), tests (tests/) and docker/netns_swarm.py share, not part of
the installed package: network namespaces with bandwidth caps and NAT (:mod:`testbed.netns`), worker
processes driven over stdin/stdout (:mod:`testbed.common` and the ``*_worker.py`` scripts, ours and
hivemind's), and the parts of the chaos run (faults, invariant checks, the probe, the swarm)."""
