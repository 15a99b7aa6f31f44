"""The plugin-data protobuf (plugin_data.proto) and its generated module."""
