"""Evaluation: answer and retrieval metrics, the evaluation loop, the text-RAG baselines."""
