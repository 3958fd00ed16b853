//! Pure core: model, validation, compiler.
