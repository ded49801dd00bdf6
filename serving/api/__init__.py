"""Public protocols at the ingress: the OpenAI Images API today (openai.py), served by ingress.py; jobs.py is
what every protocol is translated to for the model deployments."""
