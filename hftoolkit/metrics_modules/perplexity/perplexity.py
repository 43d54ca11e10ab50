"""Perplexity of texts under a causal LM, as an offline `evaluate` module with the interface of the Hub module
`perplexity`.

Loaded by `hftoolkit.metrics.load("perplexity")` through `evaluate.load(<this folder>)`. `model_id` may be a
local folder written by `save_pretrained`; the model runs on CUDA when available, else on CPU.
"""

import datasets
import evaluate
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

_CITATION = """\
@article{jelinek-1977-perplexity,
    title = "Perplexity--a measure of the difficulty of speech recognition tasks",
    author = "Jelinek, Fred and Mercer, Robert L. and Bahl, Lalit R. and Baker, James K.",
    journal = "The Journal of the Acoustical Society of America",
    volume = "62",
    number = "S1",
    year = "1977",
    pages = "S63--S63",
}
"""

_DESCRIPTION = """\
Perplexity is the exponential of the mean negative log-likelihood per token that a causal language model assigns
to a text: exp(-1/N * sum_i log p(token_i | tokens before i)). Lower is better; a model that guesses uniformly
over a vocabulary of V tokens scores V. Each text gets its own perplexity and mean_perplexity is their plain
average over texts (not a token-weighted corpus perplexity).
Same definition and arguments as the Hub module; unlike it, the model is loaded in float32 whatever the
checkpoint's dtype, padding is always on the right, the tokenizer is not given a pad token, texts longer than
the model's context are truncated rather than failing, and bad input raises ValueError instead of an assert.
See https://huggingface.co/docs/transformers/perplexity.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model_id (str): Hub id or local folder of a causal LM and its tokenizer (loaded with
        AutoModelForCausalLM / AutoTokenizer, in float32, without remote code).
    batch_size (int): texts per forward pass. Defaults to 16. Padding is on the right and masked, so the
        batch size does not change the numbers.
    add_start_token (bool): prepend the tokenizer's BOS token so that the first token of each text is scored
        too. Defaults to True. With False, each text needs at least two tokens.
    max_length (int, optional): truncate each text to this many tokens, BOS included. Defaults to the model's
        context length.
    device (str, optional): "cpu", "cuda" or "gpu". Defaults to "cuda" when available, else "cpu".
Returns:
    perplexities (list of float): one per text.
    mean_perplexity (float): the mean of `perplexities`.
Examples:
    >>> perplexity = evaluate.load("hftoolkit/metrics_modules/perplexity")
    >>> result = perplexity.compute(predictions=["Hello, my dog is cute"], model_id="runs/example/model")
    >>> sorted(result)
    ['mean_perplexity', 'perplexities']
"""


def _resolve_device(device):
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda", "gpu"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'gpu', got {device!r}")
    return "cuda" if device == "gpu" else device


def _context_length(model):
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(
        self, predictions, model_id, batch_size=16, add_start_token=True, device=None, max_length=None
    ):
        device = _resolve_device(device)
        # float32 whatever the checkpoint's dtype: perplexity is a sum of many small log-probabilities.
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32).to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(model_id)

        if add_start_token and tokenizer.bos_token_id is None:
            raise ValueError(
                f"add_start_token=True needs a BOS token, and the tokenizer of {model_id} has none"
            )
        max_length = max_length or _context_length(model)
        max_text_tokens = max_length - 1 if (max_length and add_start_token) else max_length
        token_ids = tokenizer(
            list(predictions),
            add_special_tokens=False,
            truncation=max_text_tokens is not None,
            max_length=max_text_tokens,
        )["input_ids"]
        if add_start_token:
            token_ids = [[tokenizer.bos_token_id, *ids] for ids in token_ids]
        too_short = [i for i, ids in enumerate(token_ids) if len(ids) < 2]
        if too_short:
            raise ValueError(
                f"texts at positions {too_short} have fewer than 2 tokens to score "
                "(empty text, or a one-token text with add_start_token=False)"
            )

        perplexities = []
        for start in range(0, len(token_ids), batch_size):
            batch = token_ids[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            # Right padding keeps every text at positions 0..n-1, as when it is scored alone; the pad id
            # is irrelevant because padded positions are masked out of attention and of the loss.
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            input_ids = input_ids.to(device)
            attention_mask = attention_mask.to(device)

            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            # Token t is predicted from the logits at t-1.
            token_nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
            )
            scored = attention_mask[:, 1:].float()
            mean_nll = (token_nll * scored).sum(dim=1) / scored.sum(dim=1)
            perplexities += torch.exp(mean_nll).tolist()

        return {"perplexities": perplexities, "mean_perplexity": float(np.mean(perplexities))}
