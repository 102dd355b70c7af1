"""Running as one process or several (torchrun): ``world`` (ranks and collectives, no-ops for one
process), ``fsdp`` (sharding the policy and its checkpoint state), ``ranks`` (the rank from the
environment, for the error printer). Import the submodules; this package re-exports nothing."""
