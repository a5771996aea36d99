"""Each CPU workaround for Megatron-Core (megapeer/parallel/cpu_shims.py) does its job."""
import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only shims")


def test_applied_and_current_device_is_cpu(world1):
    from megapeer.parallel import cpu_shims
    assert cpu_shims.applied()
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # no-op instead of an error


def test_cuda_literal_modules_create_cpu_tensors(world1):
    from megatron.core.utils import local_multi_tensor_l2_norm
    ts = [torch.ones(3), 2 * torch.ones(4)]
    norm, _ = local_multi_tensor_l2_norm(1, None, [ts], False)
    assert norm.device.type == "cpu"
    assert torch.isclose(norm, torch.tensor([19.0]).sqrt()).all()


def test_cuda_type_names_for_cpu_tensors(world1):
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversion unchanged
    assert torch.ones(1).cuda().device.type == "cpu"


def test_rng_tracker_forks_the_cpu_generator(world1):
    from megatron.core import tensor_parallel
    from megapeer.config import ParallelConfig
    from megapeer.parallel import init_model_parallel
    init_model_parallel(ParallelConfig(), seed=5)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(3)
    outside = torch.rand(3)
    init_model_parallel(ParallelConfig(), seed=5)
    torch.manual_seed(0)
    with tracker.fork():
        b = torch.rand(3)
    assert torch.equal(a, b)                  # the forked stream is reproducible
    torch.manual_seed(0)
    assert torch.equal(outside, torch.rand(3))  # and leaves the default stream untouched


def test_streams_and_events_are_inert(world1):
    s = torch.cuda.Stream()
    e = torch.cuda.Event()
    e.record()
    s.wait_event(e)
    with torch.cuda.stream(s):
        pass


def test_batched_p2p_off_on_cpu():
    """Interleaved pipelines with batched p2p give wrong gradients on gloo."""
    from megapeer.config import load_config
    from megapeer.models import transformer_config
    cfg = load_config(overrides=["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
                      world_size=2)
    tc = transformer_config(cfg.model, cfg.parallel, cfg.training)
    assert tc.batch_p2p_comm is False and tc.batch_p2p_sync is False
