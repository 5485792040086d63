"""The running batch's KV cache layer: the same attention inputs as transformers' DynamicLayer, written in place
(no copy until the free columns run out), and assignments by the running batch taken as the new contents."""

from __future__ import annotations

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from lmforge.generate.cache import SlackLayer, with_slack


def test_a_slack_layer_returns_what_a_dynamic_layer_returns_and_copies_only_when_full():
    torch.manual_seed(0)
    steps = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 1, 1)]
    plain, slack = DynamicCache(), with_slack(DynamicCache())
    plain.update(steps[0], -steps[0], 0)
    slack.layers = [SlackLayer(slack=2)]
    buffers = []
    for k in steps:
        if k is not steps[0]:
            plain.update(k, -k, 0)
        keys, values = slack.update(k, -k, 0)
        buffers.append(slack.layers[0]._keys.data_ptr())
        torch.testing.assert_close(keys, plain.layers[0].keys, rtol=0, atol=0)
        torch.testing.assert_close(values, plain.layers[0].values, rtol=0, atol=0)
    assert slack.get_seq_length() == 9
    # 5 columns + 2 free; steps 2 and 3 fill them in place; step 4 grows (to 8 + 2), step 5 writes in place
    assert buffers[0] == buffers[1] == buffers[2] != buffers[3] == buffers[4]


def test_assigning_keys_then_values_replaces_the_contents():
    layer = SlackLayer(torch.zeros(2, 1, 3, 4), torch.ones(2, 1, 3, 4))
    layer.update(torch.zeros(2, 1, 1, 4), torch.ones(2, 1, 1, 4))
    layer.keys = layer.keys[[1], :, 2:]  # as the running batch drops a row and the columns no row uses
    assert layer.values.shape == (2, 1, 4, 4)  # until it is assigned too, values keep their own length
    layer.values = layer.values[[1], :, 2:]
    assert layer.keys.shape == layer.values.shape == (1, 1, 2, 4) and layer.get_seq_length() == 2


def test_a_model_decodes_the_same_logits_on_either_cache():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=128,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.inference_mode():
        logits = {}
        for name in ("plain", "slack"):
            out = model(input_ids=ids, use_cache=True)
            cache = out.past_key_values if name == "plain" else with_slack(out.past_key_values)
            got = []
            for step in range(70):  # past the first growth
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=token, past_key_values=cache, use_cache=True,
                            position_ids=torch.full((2, 1), 6 + step))
                got.append(out.logits[:, -1])
            logits[name] = torch.stack(got)
    torch.testing.assert_close(logits["slack"], logits["plain"])


def test_rows_join_padded_on_the_left_and_leave_keeping_free_columns():
    layer = SlackLayer(torch.ones(1, 1, 2, 2), -torch.ones(1, 1, 2, 2), slack=4)
    layer.add_rows(torch.full((2, 1, 3, 2), 2.0), torch.full((2, 1, 3, 2), -2.0))
    assert layer.get_seq_length() == 3 and layer._keys.shape[2] == 3 + 4
    assert layer.keys[0, 0, :, 0].tolist() == [0.0, 1.0, 1.0] and layer.keys[1, 0, :, 0].tolist() == [2.0] * 3
    assert layer.values[0, 0, :, 0].tolist() == [0.0, -1.0, -1.0]
    layer.select_rows(torch.tensor([0, 2]), first=1)  # row 1 leaves; column 0 is padding in every row left
    assert layer.keys[:, 0, :, 0].tolist() == [[1.0, 1.0], [2.0, 2.0]] and layer.get_seq_length() == 2
    buffer = layer._keys.data_ptr()
    keys, _ = layer.update(torch.full((2, 1, 1, 2), 5.0), torch.zeros(2, 1, 1, 2))
    assert layer._keys.data_ptr() == buffer and keys[:, 0, :, 0].tolist() == [[1.0, 1.0, 5.0], [2.0, 2.0, 5.0]]
