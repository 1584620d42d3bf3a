"""The frontends: what turns the engine into a product. The OpenAI protocol and its
server (openai_format, server, batch_api), the offline batch job (batch/) and the Ray
fleet (fleet/). Each imports the core (ridgeline.engine) and never the other way."""
