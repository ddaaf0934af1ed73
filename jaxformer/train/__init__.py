"""Training, shared by both models: the loop and its Task interface, run settings, the jitted steps,
optimizer and schedules, checkpoints, preemption, metrics, sharding, multi-process start, FLOPs."""
