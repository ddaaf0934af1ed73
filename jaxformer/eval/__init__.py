"""Standard evaluations of a GPT-2: continuation log-likelihoods, batched and bucketed (scoring),
HellaSwag scored as llm.c does (hellaswag), and a model for EleutherAI's lm-eval harness (harness)."""
