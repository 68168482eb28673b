"""Task recipes: one per use of prefix tuning, each runnable against a running server.

    python -m recipes.sst2 --base-url http://127.0.0.1:8000/v1 --api-key $KEY --model default

`sst2`, `trec` (classification), `qasrl` (semantic role labelling), `multi30k` (English -> German
translation), `e2e` (table-to-text), `wnut17` (sequence labelling). The shared flow is in
`recipes.common`, the scores in `recipes.scoring`; prompt formats and splits: docs/RECIPES.md.
"""

NAMES = ("sst2", "trec", "qasrl", "multi30k", "e2e", "wnut17")
