"""Training data with grain: tokenizers, document sources, packing, sharding and resumable batches.

```python
from dlax_training.data import make_dataset, make_tokenizer
batches = make_dataset("embedded", seq_len=256, global_batch_size=8, seed=0)   # byte tokenizer
batch = next(batches)   # tokens [8, 257] int32, loss_mask [8, 256] bool, segment_ids [8, 257]
state = batches.get_state()   # JSON-able; batches.set_state(state) resumes exactly
```

Modules: `tokenizer` (byte-level default, HF `tokenizer.json`), `sources` (text, JSONL, ChatML,
the embedded corpus), `synthetic` (passkey, MQAR), `pipeline` (`make_dataset`).
"""

from dlax_training.data.pipeline import DataIterator, make_dataset
from dlax_training.data.sources import (SOURCES, ChatDocuments, Source, TextDocuments,
                                        corpus_source, make_source, render_chatml)
from dlax_training.data.synthetic import MQARDocuments, PasskeyDocuments
from dlax_training.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "SOURCES", "ByteTokenizer", "ChatDocuments", "DataIterator", "HFTokenizer", "MQARDocuments",
    "PasskeyDocuments", "Source", "TextDocuments", "Tokenizer", "corpus_source", "make_dataset",
    "make_source", "make_tokenizer", "render_chatml",
]
