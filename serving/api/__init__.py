"""Public protocols at the ingress: the OpenAI Images API (openai.py; its routes, a router, in openai_routes.py) on the
shared FastAPI app (http.py), combined by ingress.py; jobs.py is what every protocol is translated to for
the model deployments."""
