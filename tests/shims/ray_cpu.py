"""TEST-ONLY shim: lets vLLM's Ray executor place CPU workers (vLLM refuses Ray on CPU).

vLLM asks the platform which Ray resource a worker needs (`ray_device_key`, empty on the
CPU platform, hence "current platform cpu does not support ray") and which accelerator ids
Ray gave each actor. This shim answers both for CPU: a custom Ray resource "vllm_cpu"
(one per worker) and the worker's rank as its "device id". Nothing else changes: Ray's
placement group, the actors, vLLM's RayExecutorV2, its message queues, worker start-up and
the plugin loading inside each actor are all real. It must run in the driver and in every
Ray worker process: tests pass it as Ray's `worker_process_setup_hook`.
Never used outside tests; on a GPU cluster vLLM's Ray executor works as shipped.
"""
RESOURCE = "vllm_cpu"


def install() -> None:
    import ray
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_executor_v2

    CpuPlatform.ray_device_key = RESOURCE

    def get_node_and_physical_gpu_ids(self):
        return ray.get_runtime_context().get_node_id(), [self._init_kwargs["rank"]]

    ray_executor_v2.RayWorkerProc.get_node_and_physical_gpu_ids = get_node_and_physical_gpu_ids


def init_ray(num_workers: int) -> None:
    """Start a local Ray cluster whose processes all run `install` first."""
    import ray

    install()
    ray.init(num_cpus=2 * num_workers, resources={RESOURCE: num_workers},
             runtime_env={"worker_process_setup_hook": f"{__name__}.install"},
             include_dashboard=False, log_to_driver=True)
