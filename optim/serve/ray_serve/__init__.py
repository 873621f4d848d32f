"""`flux2-accel serve`: the OpenAI-compatible image API over the engine, on Ray Serve (docs/serving.md).

config.py reads and checks the TOML file (no Ray); deployments.py holds the Serve deployments (ApiIngress,
Generator, TextEncoder); launcher.py starts or joins Ray and deploys the app; jobs.py is what the ingress hands a
Generator. Ray Serve is the optional extra `flux2-accel[serve]`.
"""
