//! Private rabbitmq server for tests (see the rabbitmq sink and source tests).
