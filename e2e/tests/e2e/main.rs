//! The end-to-end suite, one test binary (one link, not one per file): real processes on loopback.

mod budget;
mod data_plane;
mod demo;
mod local_mode;
mod openai_client;
mod rotation;
mod traces;
