"""Write the sample prompt files in ``sample_jobs/`` (committed; re-run to regenerate).

The rows share prefixes the way real offline jobs do: one system prompt for everything,
then a handful of documents, each asked several questions. The same rows are written as
plain JSONL (chat rows), Parquet, and OpenAI Batch API JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
SYSTEM = (
    "You are a careful analyst. Answer using only the document you are given, in one or two "
    "sentences, and say so when the document does not contain the answer."
)
DOCUMENTS = {
    "lighthouse": "The harbour lighthouse was built in 1871 from local granite. Its lamp burned "
    "paraffin until 1923, when it was electrified; an automatic beacon replaced the keepers in 1968.",
    "bakery": "The bakery opens at six and sells out of rye bread by nine. Its sourdough starter "
    "is forty years old and is fed twice a day with flour milled two villages away.",
    "orchard": "The orchard grows eleven apple varieties on a south-facing slope. Frost in late "
    "April can destroy the blossom, so the growers light smudge pots on cold nights.",
    "ferry": "The ferry crosses the strait eight times a day in summer and four times in winter. "
    "It carries forty cars and stops running when the wind is above gale force.",
}
QUESTIONS = [
    "When did the main change described in the document happen?",
    "What is the biggest risk mentioned?",
    "Summarise the document for a child.",
]


def rows() -> list[dict]:
    out = []
    for doc_name, doc in DOCUMENTS.items():
        for q_index, question in enumerate(QUESTIONS):
            out.append(
                {
                    "id": f"{doc_name}-q{q_index}",
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {question}"},
                    ],
                    "max_tokens": 48 if q_index == 2 else 24,
                }
            )
    return out


def main() -> None:
    data = rows()
    with open(HERE / "docs_qa.jsonl", "w") as f:
        for row in data:
            f.write(json.dumps(row) + "\n")
    pq.write_table(pa.Table.from_pylist(data), HERE / "docs_qa.parquet")
    with open(HERE / "openai_batch.jsonl", "w") as f:
        for row in data:
            request = {
                "custom_id": row["id"],
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "tiny-llama", "messages": row["messages"], "max_tokens": row["max_tokens"]},
            }
            f.write(json.dumps(request) + "\n")
    print(f"wrote {len(data)} rows to docs_qa.jsonl, docs_qa.parquet and openai_batch.jsonl")


if __name__ == "__main__":
    main()
