"""Speed and memory benchmarks, the home of ``diffrl bench``: methods, overhead, rewards, gpu (orchestration)."""
