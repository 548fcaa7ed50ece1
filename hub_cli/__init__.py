"""hub_cli: models from Hugging Face, ModelScope or OpenXLab to a running vLLM server, with LMDeploy's flags.

The ``hub_cli`` command (``cli.py``) has five subcommands, each over a library module that tests call
directly: ``fetch`` (fetch.py, with openxlab.py for OpenXLab's protocol), ``models`` (catalogue.py, the
supported models and their memory), ``serve`` (serve.py: LMDeploy's flags -> vLLM's; launch.py starts and
supervises the server), ``chat`` (chat.py) and ``demo`` (demo.py: a tiny model, offline). errors.py holds the
one-line errors and their exit codes.
"""
