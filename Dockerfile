# vmafx-sidecar image: docker build -t ghcr.io/vmafx/vmafx-sidecar:<version> .
# The build stage is the only one with pip, a shell and compilers; it installs the sidecar and its
# runtime dependencies (numpy, onnx) into /app, the one directory the distroless stage copies.
FROM python:3.13-slim-trixie AS build
WORKDIR /src
COPY pyproject.toml README.md vmafx_sidecar.py vmafx_feedback.py vmafx_onnx_builder.py image_prune.py ./
# image_prune.py deletes the test suites and test data the wheels ship (nearly a third of the layer), then
# checks that the sidecar still imports. Unchecked-hash .pyc files stay valid whatever mtimes the copy gives the
# sources, so the read-only container never compiles anything at start. tests/test_image.py runs this step.
RUN pip install --no-cache-dir --no-compile --target /app . \
 && python image_prune.py /app \
 && python -m compileall -q --invalidation-mode unchecked-hash /app

# Python 3.13, as in the build stage: the copied extension modules are built for it.
FROM gcr.io/distroless/python3-debian13:nonroot
COPY --from=build /app /app
ENV PYTHONPATH=/app
USER 65532:65532
ENTRYPOINT ["/usr/bin/python3", "-m", "vmafx_sidecar"]
CMD ["serve"]
