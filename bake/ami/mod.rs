//! Amazon Machine Images. [`instance`]: the builder-instance strategy (launch a vendor image,
//! provision it over SSH, create the image), with every temporary resource journalled and
//! removed.

pub mod instance;
