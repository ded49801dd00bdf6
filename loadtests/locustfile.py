"""Locust users posting the same OpenAI requests as a genserve scenario, for those who drive load with
Locust (not a genserve dependency: `pip install locust`):

    GENSERVE_SCENARIO=loadtests/scenarios/smoke.yaml locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

Only the mix is taken from the scenario; Locust's own users, spawn rate and run time set the load, and
Locust is a closed-loop generator, so for open-loop numbers use `genserve loadtest`."""
import os
import random

from locust import HttpUser, constant, task

from loadtests.clients import openai_body
from loadtests.scenario import load_scenario

SCENARIO = load_scenario(os.environ.get("GENSERVE_SCENARIO", "loadtests/scenarios/smoke.yaml"))


class GenserveUser(HttpUser):
    host = SCENARIO.url
    wait_time = constant(0)

    @task
    def generate(self) -> None:
        template = random.choices(SCENARIO.mix, weights=[t.weight for t in SCENARIO.mix])[0]
        body = openai_body(template, random.getrandbits(32))
        with self.client.post("/v1/images/generations", json=body, name=f"{template.model} n={template.n}",
                              catch_response=True) as response:
            if response.status_code == 429:
                response.failure(f"rejected: Retry-After {response.headers.get('Retry-After')}")
