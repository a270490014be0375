"""The execution branch: one rank's runtime, the launcher that starts the ranks on a backend, and
what each rank measures. Imports pyengine.model, pyengine.schedule and pyengine.transport;
never pyengine.predict."""
