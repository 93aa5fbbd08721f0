"""mpncov's in-tree PEP 517 build backend (pyproject.toml: build-backend = "mpncov_build.backend").

* backend.py            the PEP 517 hooks: where each one runs, and with which setuptools
* build_isolation.py    pip's build isolation, and the environment of a child process that
                        sees the torch of the interpreter that runs pip
* wheel_writer.py       wheels and editable wheels written with the standard library, for
                        environments whose setuptools cannot write them (no `wheel`)
* torch_requirement.py  the torch mpncov builds against: floor, version check, messages
* cuda_toolkit.py       which CUDA toolkit setup.py compiles the CUDA kernels with
"""
