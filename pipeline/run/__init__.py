"""The run machinery behind the CLIs: engine build, training loop, checkpoints and run folders,
evaluation loop, logging, distributed helpers, pre-launch checks."""
