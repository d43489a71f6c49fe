//! Private kafka server for tests (see the kafka sink and source tests).
