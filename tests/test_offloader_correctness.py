"""The offloader's contract on real (tiny) transformers models: outputs exactly equal to the
resident model, every tensor moved whatever its dtype, nothing copied back, nothing re-pinned,
and detach() restoring the model exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from tracedoffload import OffloadConfig, RecordingTimeline, offload
from tracedoffload.offloader import HOOK_ATTR
from tracedoffload.timeline import COMPUTE, RELEASE, TRANSFER
from tests.tracing.conftest import tiny_model

PROMPT = torch.arange(3, 10).unsqueeze(0)


def llama():
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)).eval()


def gpt2():
    torch.manual_seed(2)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64)).eval()


def opt():
    torch.manual_seed(3)
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)).eval()


def greedy(model):
    with torch.inference_mode():
        return model.generate(PROMPT, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)


class TestExactOutputs:
    @pytest.mark.parametrize("build", [tiny_model, llama, gpt2, opt], ids=["qwen2", "llama", "gpt2", "opt"])
    @pytest.mark.parametrize("gpu_layers", [0, 2, "all"])
    def test_generate_with_kv_cache_equals_resident(self, build, gpu_layers):
        """Greedy generate() tokens and logits equal the un-offloaded model's, for none, some and all layers resident."""
        model = build()
        expected = greedy(model)
        with torch.inference_mode():
            expected_logits = model(PROMPT).logits
        with offload(model, OffloadConfig(num_layers_on_gpu=model.config.num_hidden_layers if gpu_layers == "all" else gpu_layers)):
            assert torch.equal(greedy(model), expected)
            with torch.inference_mode():
                assert torch.equal(model(PROMPT).logits, expected_logits)

    @pytest.mark.parametrize("residency", ["interleaved", "first", "last"])
    @pytest.mark.parametrize("prefetch", [0, 1, 2])
    def test_every_residency_and_prefetch_depth(self, residency, prefetch):
        """Each residency policy and prefetch depth gives the exact resident output."""
        model = tiny_model()
        expected = greedy(model)
        with offload(model, OffloadConfig(num_layers_on_gpu=2, residency=residency, prefetch=prefetch)) as offloader:
            assert torch.equal(greedy(model), expected)
            assert offloader.num_slots == min(prefetch + 1, 4)


class QuantizedBlock(nn.Module):
    """A layer with the tensors offloaders get wrong: float8 weights with a float32 scale, int8 and
    bool buffers, a transposed (non-contiguous) parameter, and a weight tied inside the layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight8 = nn.Parameter(torch.randn(width, width).to(torch.float8_e4m3fn), requires_grad=False)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("codes", torch.randint(-128, 127, (width,), dtype=torch.int8))
        self.register_buffer("mask", torch.rand(width) > 0.5)
        self.transposed = nn.Parameter(torch.randn(width, width).t())
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.b.weight = self.a.weight  # tied within the layer

    def forward(self, x):
        y = x @ (self.weight8.to(torch.float32) * self.scale) + self.codes.to(torch.float32) * self.mask
        return self.b(self.a(y @ self.transposed))


class Stack(nn.Module):
    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList([QuantizedBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, width)
        self.layers[1].a.bias = self.head.bias  # shared with a resident module outside the layer

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class TestEveryTensorMoves:
    def test_float8_int8_bool_strided_and_tied_tensors(self):
        """A stack of such layers gives bitwise-equal output offloaded, and every tensor of an offloaded layer is packed."""
        torch.manual_seed(0)
        model = Stack().eval()
        x = torch.randn(3, 16)
        with torch.no_grad():
            expected = model(x)
        with offload(model, OffloadConfig(num_layers_on_gpu=0)) as offloader:
            with torch.no_grad():
                assert torch.equal(model(x), expected)
            layer = model.layers[0]
            flat = offloader.host_buffer(0)
            start, end = flat.data_ptr(), flat.data_ptr() + flat.numel()
            for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
                assert start <= tensor.data_ptr() < end, name
            assert model.layers[1].a.bias.data_ptr() == model.head.bias.data_ptr()  # shared one stayed put
            assert model.layers[0].transposed.stride() == (1, 16)

    def test_shared_tensor_stays_resident(self):
        """A tensor shared with a resident module is not packed into the layer's host buffer."""
        torch.manual_seed(0)
        model = Stack().eval()
        with offload(model, OffloadConfig(num_layers_on_gpu=0)) as offloader:
            flat = offloader.host_buffer(1)
            assert not flat.data_ptr() <= model.layers[1].a.bias.data_ptr() < flat.data_ptr() + flat.numel()


class TestNoCopyBackNoRepinning:
    def test_release_points_back_at_the_same_host_buffer(self):
        """After each forward, offloaded tensors point into the same host buffers: no copy back, no new host tensors."""
        model = tiny_model()
        with offload(model, OffloadConfig(num_layers_on_gpu=2)) as offloader:
            pointers = {i: offloader.host_buffer(i).data_ptr() for i in offloader.offloaded_indices}
            layer_ptrs = {i: [p.data_ptr() for p in offloader.layers[i].parameters()] for i in offloader.offloaded_indices}
            pool = offloader.device_pool_bytes
            for _ in range(3):
                greedy(model)
            assert {i: offloader.host_buffer(i).data_ptr() for i in offloader.offloaded_indices} == pointers
            assert {i: [p.data_ptr() for p in offloader.layers[i].parameters()] for i in offloader.offloaded_indices} == layer_ptrs
            assert offloader.device_pool_bytes == pool

    def test_weights_are_unchanged_bitwise(self):
        """Many forwards later the weights are bitwise what they were."""
        model = tiny_model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with offload(model, OffloadConfig(num_layers_on_gpu=1)):
            greedy(model)
            after = model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)


class TestDetach:
    def test_detach_restores_the_model_exactly(self):
        """detach() removes every hook and marker and leaves each parameter the same object, device, dtype, shape and values."""
        model = tiny_model()
        objects = {name: (p, p.device, p.dtype, p.shape, p.stride(), p.clone()) for name, p in model.named_parameters()}
        hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
        offloader = offload(model, OffloadConfig(num_layers_on_gpu=2))
        greedy(model)
        offloader.detach()
        assert {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()} == hooks
        assert not any(hasattr(m, HOOK_ATTR) for m in model.modules())
        for name, p in model.named_parameters():
            obj, device, dtype, shape, stride, values = objects[name]
            assert p is obj and p.device == device and p.dtype == dtype and p.shape == shape and p.stride() == stride
            assert torch.equal(p, values)
        offloader.detach()  # a second detach is a no-op
        with offload(model, OffloadConfig(num_layers_on_gpu=3)):  # and it can be offloaded again
            greedy(model)

    def test_context_manager_detaches_on_error(self):
        """Leaving the with-block by an exception still restores the model."""
        model = tiny_model()
        with pytest.raises(RuntimeError):
            with offload(model, OffloadConfig(num_layers_on_gpu=2)):
                raise RuntimeError("boom")
        assert not any(hasattr(m, HOOK_ATTR) for m in model.modules())


class TestTimeline:
    def test_records_per_step(self):
        """Per forward: a compute record per layer and a transfer and release per offloaded layer, with the packed bytes."""
        model = tiny_model()
        timeline = RecordingTimeline()
        with offload(model, OffloadConfig(num_layers_on_gpu=2), timeline=timeline) as offloader:
            greedy(model)
            offloaded = set(offloader.offloaded_indices)
            for step in list(timeline.steps)[1:]:
                computes = [r for r in step.records if r.kind == COMPUTE]
                releases = [r for r in step.records if r.kind == RELEASE]
                transfers = [r for r in step.records if r.kind == TRANSFER]
                assert [r.layer_index for r in computes] == list(range(6))
                assert {r.layer_index for r in releases} == offloaded
                assert {r.layer_index for r in transfers} == offloaded
                assert all(r.prefetched for r in transfers)
                assert all(r.nbytes == offloader.layer_bytes(r.layer_index) for r in transfers)
                assert step.start <= min(r.start for r in step.records) and max(r.end for r in step.records) <= step.end

    def test_out_of_order_execution_is_exact_and_learned(self):
        """Layers run in reverse of the listed order: outputs stay exact and prefetch learns the real order."""

        class Reversed(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(5)])

            def forward(self, x):
                for layer in reversed(self.layers):
                    x = layer(x)
                return x

        torch.manual_seed(0)
        model = Reversed()
        x = torch.randn(2, 8)
        with torch.no_grad():
            expected = model(x)
        timeline = RecordingTimeline()
        with offload(model, OffloadConfig(num_layers_on_gpu=1), timeline=timeline):
            with torch.no_grad():
                for _ in range(3):
                    assert torch.equal(model(x), expected)
        last = [r for r in timeline.steps[-1].records if r.kind == TRANSFER]
        assert last and all(r.prefetched for r in last)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    def test_pinned_buffers_and_exact_output_on_gpu(self):
        """On a GPU: host buffers are pinned once, pinned bytes are accounted, output equals resident."""
        model = tiny_model().cuda()
        prompt = PROMPT.cuda()
        with torch.inference_mode():
            expected = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        model.cpu()
        with offload(model, OffloadConfig(num_layers_on_gpu=2, device="cuda")) as offloader:
            assert all(offloader.host_buffer(i).is_pinned() for i in offloader.offloaded_indices)
            assert offloader.pinned_bytes == offloader.offloaded_bytes > 0
            with torch.inference_mode():
                out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert torch.equal(out, expected)
        assert all(p.device.type == "cpu" for p in model.parameters())


class TestMarkersOnlyWhenListenedTo:
    def test_no_markers_are_taken_for_a_timeline_that_does_not_want_them(self):
        """With nothing listening (the default NullTimeline, or any timeline that says it wants
        no markers) no host-clock reading or CUDA timing event is taken: records carry None.
        A timeline that reads them gets them, and can be swapped in and out."""
        from tracedoffload import RecordingTimeline, offload, OffloadConfig
        from tracedoffload.timeline import NullTimeline, Timeline

        class Blind(Timeline):
            wants_markers = False

            def __init__(self) -> None:
                self.markers = []

            def step_begin(self, marker):
                self.markers.append(marker)

            def layer(self, record):
                self.markers += [record.start, record.end]

        model = tiny_model()
        ids = torch.arange(5).unsqueeze(0)
        with offload(model, OffloadConfig(num_layers_on_gpu=2)) as offloader:
            assert isinstance(offloader.timeline, NullTimeline)
            blind = Blind()
            offloader.timeline = blind
            with torch.inference_mode():
                model(ids)
            assert blind.markers and all(marker is None for marker in blind.markers)
            recording = RecordingTimeline()
            offloader.timeline = recording
            with torch.inference_mode():
                model(ids)
            records = recording.records()
            assert records and all(isinstance(r.start, int) and isinstance(r.end, int) for r in records)
