import pytest
import torch

from sharq._cuda_graph import capture, warm_up

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_captured_forward_replays_what_it_computes_eagerly():
    x = torch.randn(64, 64, device="cuda")

    def forward() -> torch.Tensor:
        return torch.relu(x @ x.T) + 1

    expected = warm_up(forward, x.device)
    graph, out = capture(forward, x.device)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, torch.relu(x @ x.T) + 1)
    assert not torch.equal(out, expected)


def test_a_failed_capture_raises_and_the_device_random_generator_still_works():
    x = torch.randn(64, device="cuda")
    with pytest.raises(RuntimeError):  # torch.AcceleratorError, a RuntimeError: the capture was invalidated
        capture(lambda: (x * 2).sum().item(), x.device)
    torch.empty(64, device="cuda").uniform_()  # raised "Offset increment outside graph capture" without the fix
    torch.cuda.synchronize()
    graph, out = capture(lambda: x * 2, x.device)  # and the next capture works
    graph.replay()
    torch.testing.assert_close(out, x * 2)
