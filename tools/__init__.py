"""The measuring and fitting scripts, run from the project root: the benchmarks, and the fits of the photo
check, the text reader and the thing namer; beside them the modules they share, which are not run themselves."""
