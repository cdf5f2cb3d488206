"""`python -m unclip_jax.aot`: the command's name kept where the code moved (unclip_jax.tools.aot)."""
import runpy

if __name__ == "__main__":
    runpy.run_module("unclip_jax.tools.aot", run_name="__main__", alter_sys=True)
